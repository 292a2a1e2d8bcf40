"""What every study layer shares: the repo root, the stage-done marker, a row's budget and a run's
logged metrics. The layers above: :mod:`~grace_lightning.study.v3` (seeds, sweeps, seed-level
statistics), :mod:`~grace_lightning.study.report` (tables) and, on top,
:mod:`~grace_lightning.study.stages` (running a study), which imports the others and is imported
by none."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
DONE = "DONE.json"


def row_minutes(cfg: DictConfig, row: Mapping[str, Any]) -> float | None:
    """A trained row's wall-time budget in minutes (row ``minutes``, else ``train_minutes``)."""
    m = row.get("minutes", cfg.get("train_minutes"))
    return float(m) if m is not None else None


def read_metrics(train_dir: Path) -> list[dict[str, float]]:
    """Rows of the run's ``metrics.csv`` (newest version dir), numeric cells only."""
    files = sorted(train_dir.glob("csv/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        return []
    rows = []
    with open(files[-1], newline="") as f:
        for rec in csv.DictReader(f):
            row = {}
            for k, v in rec.items():
                try:
                    row[k] = float(v)
                except (TypeError, ValueError):
                    continue
            rows.append(row)
    return rows
