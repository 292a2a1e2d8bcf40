"""Paired-bootstrap 95% intervals for MTEB-style averages (study v2, issue 11 item 7).

MTEB's main scores are corpus-level (Spearman over all pairs, accuracy over all test items,
nDCG@10 averaged over queries, V-measure of one clustering), so an interval needs per-example
data. :func:`sts_examples` & co. turn a task's embeddings into the few arrays that its main score
is a function of; :func:`task_score` recomputes that score on any resample of the examples:

============== ================================ =============================================
task type      resampled unit                   statistic recomputed on the resample
============== ================================ =============================================
STS            sentence pairs                   Spearman(cosine, gold) x100
Retrieval      queries (corpus fixed)           mean per-query nDCG@10 x100 (pytrec_eval)
Classification test items (classifiers fixed)   mean over items of the fraction of the mteb
                                                logistic-regression experiments that got it
                                                right = mteb's accuracy x100
Clustering     none: the point only             (V-measure x100 of one fixed k-means assignment,
                                                kept for the record)
============== ================================ =============================================

Clustering is held at its point (no width, issue 19): resampling documents with replacement
duplicates them, and a duplicated document always lands in its copy's cluster, so V-measure on a
resample is biased upward (simulated: point 55.8, resample mean 60.3; the issue's: 85.0 vs 89.4,
the 95% interval excluding the point). Resampling whole clusters does not fix it either (a
drawn-twice cluster merges with its copy). The other three reproduce mteb's main score exactly on
the full sample (up to score ties).

**Paired**: resample indices are drawn per task from ``(seed, task name)`` only, so two models
evaluated on the same task data get the same resamples; a difference interval is the percentile
interval of ``Avg*_b(A) - Avg*_b(B)`` over the same ``b``. Identical models give a zero-width
interval at 0.

**Avg**: a replicate is the mean over tasks of ``reported_t + (theta*_tb - theta_t)`` (the
resample's deviation from the recomputed full-sample score, added to the score mteb reported), so
the interval sits around the table's number even where the recomputation differs slightly from
mteb's (clustering). A task without per-example data contributes its reported score unchanged
(no width): the report says which tasks had intervals.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("spearman", "mean", "v_measure")
POINT_ONLY = ("v_measure",)  # kinds whose resampling is biased: no interval width (module doc)
KIND_OF_TYPE = {
    "STS": "spearman",
    "Retrieval": "mean",
    "Classification": "mean",
    "Clustering": "v_measure",
}


@dataclass
class TaskExamples:
    """Per-example data of one task: ``a``/``b`` are (n,) arrays whose statistic is the score.

    spearman: a = cosine, b = gold; mean: a = per-example score (x100), b unused;
    v_measure: a = gold label ids, b = cluster ids. ``reported``: mteb's score x100.
    ``key``: digest of the examples' identity (texts), equal for two models on the same data.
    """

    task: str
    category: str
    kind: str
    a: np.ndarray  # (n,)
    b: np.ndarray | None = None  # (n,) or None
    reported: float | None = None
    key: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"TaskExamples.kind={self.kind!r}; use one of {KINDS}")
        self.a = np.asarray(self.a, dtype=np.float64)
        if self.b is not None:
            self.b = np.asarray(self.b, dtype=np.float64)
            if self.b.shape != self.a.shape:
                raise ValueError(f"{self.task}: a {self.a.shape} and b {self.b.shape} differ")

    @property
    def n(self) -> int:
        return int(self.a.shape[0])

    def score(self, idx: np.ndarray | None = None) -> float:
        """The task's main score x100 on examples ``idx`` (all when None)."""
        return task_score(self.kind, self.a, self.b, idx)

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "category": self.category,
            "kind": self.kind,
            "a": self.a.tolist(),
            "b": None if self.b is None else self.b.tolist(),
            "reported": self.reported,
            "key": self.key,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TaskExamples:
        return cls(
            task=d["task"],
            category=d["category"],
            kind=d["kind"],
            a=np.asarray(d["a"]),
            b=None if d.get("b") is None else np.asarray(d["b"]),
            reported=d.get("reported"),
            key=d.get("key", ""),
            extra=dict(d.get("extra") or {}),
        )


# ---------------------------------------------------------------------------- statistics
def _rank(x: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (ties share their mean rank), as scipy's rankdata."""
    from scipy.stats import rankdata

    return rankdata(x, axis=-1)


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row pair: x, y (B, n) -> (B,); 0 where a row is constant."""
    rx, ry = _rank(x), _rank(y)
    rx = rx - rx.mean(axis=-1, keepdims=True)
    ry = ry - ry.mean(axis=-1, keepdims=True)
    den = np.sqrt((rx * rx).sum(-1) * (ry * ry).sum(-1))
    num = (rx * ry).sum(-1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def task_score(kind: str, a: np.ndarray, b: np.ndarray | None, idx: np.ndarray | None) -> float:
    """Main score x100 of one task on examples ``idx`` (see :class:`TaskExamples`)."""
    a_ = a if idx is None else a[idx]
    b_ = None if b is None else (b if idx is None else b[idx])
    if kind == "spearman":
        return float(100 * spearman_rows(a_[None], b_[None])[0])
    if kind == "mean":
        return float(a_.mean())
    if kind == "v_measure":
        from sklearn.metrics import v_measure_score

        return float(100 * v_measure_score(a_.astype(int), b_.astype(int)))
    raise ValueError(f"kind={kind!r}; use one of {KINDS}")


def task_replicates(ex: TaskExamples, idx: np.ndarray) -> np.ndarray:
    """Scores x100 on each resample: idx (B, n) -> (B,). Vectorised for spearman / mean."""
    if ex.kind == "spearman":
        return 100 * spearman_rows(ex.a[idx], ex.b[idx])
    if ex.kind == "mean":
        return ex.a[idx].mean(axis=1)
    return np.array([ex.score(row) for row in idx])


def resample_indices(task: str, n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) indices drawn with replacement; depends on (seed, task, n) only: paired."""
    rng = np.random.default_rng([seed, zlib.crc32(task.encode()), n])
    return rng.integers(0, n, size=(n_boot, n))


def percentile_interval(reps: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    lo, hi = np.quantile(reps, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------- runs
def avg_replicates(
    tasks: Mapping[str, TaskExamples],
    reported: Mapping[str, float],
    n_boot: int,
    seed: int,
) -> np.ndarray:
    """(n_boot,) replicates of the mean over ``reported``'s tasks (see module doc)."""
    total = np.zeros(n_boot)
    for name, score in reported.items():
        ex = tasks.get(name)
        if ex is None or ex.n < 2 or ex.kind in POINT_ONLY:
            total += score
            continue
        idx = resample_indices(name, ex.n, n_boot, seed)
        total += score + (task_replicates(ex, idx) - ex.score())
    return total / max(len(reported), 1)


def bootstrap_runs(
    runs: Mapping[str, Mapping[str, Any]],
    references: Sequence[str] = (),
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Intervals for every run's Avg and for its difference to each reference run.

    ``runs``: name -> ``{"scores": {task: reported x100}, "examples": {task: TaskExamples}}``.
    Differences are over the tasks both runs have; a task whose example ``key`` differs between
    the two runs (not the same data) is held fixed in the difference and named in ``unpaired``.
    Returns name -> ``{avg, avg_ci, n_tasks, tasks_with_ci, diff: {ref: {delta, ci, n_tasks,
    unpaired}}}``.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, run in runs.items():
        scores, examples = dict(run["scores"]), dict(run.get("examples") or {})
        reps = avg_replicates(examples, scores, n_boot, seed)
        out[name] = {
            "avg": float(np.mean(list(scores.values()))) if scores else None,
            "avg_ci": percentile_interval(reps, level) if scores else None,
            "n_tasks": len(scores),
            "tasks_with_ci": sorted(
                t
                for t in scores
                if t in examples and examples[t].n >= 2 and examples[t].kind not in POINT_ONLY
            ),
            "diff": {},
        }
    for name, run in runs.items():
        for ref in references:
            if ref not in runs:
                continue
            other = runs[ref]
            common = [t for t in run["scores"] if t in other["scores"]]
            if not common:
                continue
            ex_a, ex_b = dict(run.get("examples") or {}), dict(other.get("examples") or {})
            unpaired = [
                t
                for t in common
                if t in ex_a
                and t in ex_b
                and (ex_a[t].key != ex_b[t].key or ex_a[t].n != ex_b[t].n)
            ]
            keep = {t: ex for t, ex in ex_a.items() if t not in unpaired}
            keep_b = {t: ex for t, ex in ex_b.items() if t not in unpaired}
            sa = {t: run["scores"][t] for t in common}
            sb = {t: other["scores"][t] for t in common}
            d = avg_replicates(keep, sa, n_boot, seed) - avg_replicates(keep_b, sb, n_boot, seed)
            out[name]["diff"][ref] = {
                "delta": float(np.mean(list(sa.values())) - np.mean(list(sb.values()))),
                "ci": percentile_interval(d, level),
                "n_tasks": len(common),
                "unpaired": unpaired,
            }
    return out


# ---------------------------------------------------------------------------- per-example data
def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def text_key(texts: Sequence[str]) -> str:
    """Digest of an ordered list of texts: the identity of a task's examples."""
    import hashlib

    h = hashlib.sha256()
    for t in texts:
        h.update(str(t).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def sts_examples(
    task: str, emb1: np.ndarray, emb2: np.ndarray, gold: Sequence[float], key: str = ""
) -> TaskExamples:
    """emb1, emb2 (n, D); gold (n,) -> cosine / gold pairs."""
    cos = (_unit(emb1) * _unit(emb2)).sum(-1)  # (n,)
    return TaskExamples(task, "STS", "spearman", cos, np.asarray(gold, dtype=np.float64), key=key)


def ndcg_at_10_per_query(
    q_emb: np.ndarray,
    d_emb: np.ndarray,
    qids: Sequence[str],
    dids: Sequence[str],
    qrels: Mapping[str, Mapping[str, int]],
    k: int = 100,
    ignore_identical_ids: bool = False,
) -> np.ndarray:
    """Per-query nDCG@10 x100 (pytrec_eval ``ndcg_cut_10``, as mteb) of cosine ranking;
    q_emb (Q, D), d_emb (N, D) -> (Q,). Only the top ``k`` documents per query are scored;
    ``ignore_identical_ids``: drop a document whose id equals the query's (mteb's task knob)."""
    import pytrec_eval

    sims = _unit(q_emb) @ _unit(d_emb).T  # (Q, N)
    top = np.argsort(-sims, axis=1)[:, :k]
    run = {
        q: {
            dids[j]: float(sims[i, j])
            for j in top[i]
            if not (ignore_identical_ids and dids[j] == q)
        }
        for i, q in enumerate(qids)
    }
    judged = {q: {d: int(s) for d, s in qrels[q].items()} for q in qids}
    per = pytrec_eval.RelevanceEvaluator(judged, {"ndcg_cut.10"}).evaluate(run)
    return np.array([100 * per.get(q, {}).get("ndcg_cut_10", 0.0) for q in qids])


def clustering_assignment(emb: np.ndarray, n_clusters: int, seed: int = 42) -> np.ndarray:
    """One k-means assignment (mteb's MiniBatchKMeans settings, one run): (n, D) -> (n,)."""
    from sklearn.cluster import MiniBatchKMeans

    km = MiniBatchKMeans(n_clusters=n_clusters, batch_size=500, n_init="auto", random_state=seed)
    return km.fit_predict(np.asarray(emb, dtype=np.float64))


def save_examples(path: str | Path, examples: Mapping[str, TaskExamples]) -> None:
    from grace_lightning.utils.atomic import atomic_write

    payload = {name: ex.to_json() for name, ex in examples.items()}
    atomic_write(Path(path), lambda f: f.write(json.dumps(payload)), mode="w")


def load_examples(path: str | Path) -> dict[str, TaskExamples]:
    path = Path(path)
    if not path.is_file():
        return {}
    return {k: TaskExamples.from_json(v) for k, v in json.loads(path.read_text()).items()}
