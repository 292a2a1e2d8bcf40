"""Seed-level statistics: a Student-t interval of a mean over training seeds, and its verdict.

Study v3's claims (`study/v3.py`) and the sweep report's seed-paired comparison
(`sweeps/report.py`) both read a difference A - B as the mean of per-seed differences, each seed's
two runs sharing everything but the arm, with a 95% t-interval over those differences (n - 1
degrees of freedom). The claim "A beats B" holds when the interval excludes 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# two-sided 95% Student-t quantiles by degrees of freedom (scipy for the rest)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """Student-t interval of the mean over seeds (n - 1 degrees of freedom); None for n < 2."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return None
    if abs(level - 0.95) < 1e-9 and x.size - 1 in T975:
        t = T975[x.size - 1]
    else:
        from scipy.stats import t as student

        t = float(student.ppf(1 - (1 - level) / 2, x.size - 1))
    half = t * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean() - half), float(x.mean() + half)


def verdict(ci: tuple[float, float] | None) -> str:
    """What an interval of A - B says about "A beats B"."""
    if ci is None:
        return "not resolved (fewer than 2 seeds)"
    if ci[0] > 0:
        return "supported"
    if ci[1] < 0:
        return "contradicted (the reverse holds)"
    return "not supported (the interval contains 0)"
