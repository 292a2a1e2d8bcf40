"""Paper-style result tables: Retr / Rerank / Clust / PairCl / Class / STS / Summ / Avg.

Scores are each task's MTEB main score x 100 (nDCG@10, MAP, V-measure, AP, accuracy, Spearman),
averaged over the task's evaluated splits and subsets. A category column is the mean over its
tasks. **Avg is the unweighted mean over all tasks**, i.e. the category columns weighted by their
task counts (15/4/11/3/12/10/1 on the full benchmark), not the mean of the columns. The paper's
own Avg column follows from neither for most rows (notes §2: e.g. Qwen2.5-1.5B GRACE's categories
imply 47.91, the paper prints 45.48), so compare Avg with the paper's only loosely.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from grace_lightning.eval.suites import CATEGORY_COLUMNS

COLUMNS = list(CATEGORY_COLUMNS.values())  # Retr ... Summ
AVG_NOTE = (
    "Scores: MTEB main score x100. A category = mean over its tasks; Avg = unweighted mean over "
    "all {n} tasks (= categories weighted by task count, not the mean of the columns). The "
    "paper's Avg column does not follow from its category columns (notes §2)."
)


def task_main_score(task_result, task=None) -> float:
    """Main score of one TaskResult over the task's own splits/subsets (all when ``task`` is None)."""
    splits = list(task.eval_splits) if task is not None else list(task_result.scores)
    subsets = set(task.hf_subsets) if task is not None else None
    values = [
        s["main_score"]
        for split in splits
        for s in task_result.scores.get(split, [])
        if subsets is None or s.get("hf_subset", "default") in subsets
    ]
    return float(np.mean(values)) if values else task_result.get_score()


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``rows``: ``{task, category (column), score}``. -> per-column means, Avg, task count."""
    by_col: dict[str, list[float]] = {c: [] for c in COLUMNS}
    for r in rows:
        by_col.setdefault(r["category"], []).append(float(r["score"]))
    scores = [float(r["score"]) for r in rows]
    return {
        "categories": {c: (float(np.mean(v)) if v else None) for c, v in by_col.items()},
        "counts": {c: len(v) for c, v in by_col.items()},
        "avg": float(np.mean(scores)) if scores else None,
        "n_tasks": len(scores),
    }


def format_cell(value: Any, float_spec: str = ".2f") -> str:
    """A table cell: "–" for a missing value, floats with ``float_spec``, anything else as str."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, float_spec)
    return str(value)


def _fmt(x: float | None) -> str:
    return format_cell(x, ".2f")


def markdown_table(runs: Sequence[dict[str, Any]], note: bool = True) -> str:
    """Rows = runs (``{label, categories, avg, n_tasks, counts}``), columns = the paper's."""
    counts = runs[0].get("counts", {}) if runs else {}
    head = [f"{c} ({counts[c]})" if counts.get(c) else c for c in COLUMNS]
    lines = [
        "| Model | " + " | ".join(head) + " | **Avg** |",
        "|---|" + "---:|" * (len(COLUMNS) + 1),
    ]
    for run in runs:
        cats = run["categories"]
        cells = [_fmt(cats.get(c)) for c in COLUMNS]
        lines.append(f"| {run['label']} | " + " | ".join(cells) + f" | **{_fmt(run['avg'])}** |")
    if note and runs:
        lines += ["", AVG_NOTE.format(n=runs[0]["n_tasks"])]
    return "\n".join(lines)


def markdown_tasks(runs: Sequence[dict[str, Any]]) -> str:
    """Per-task scores, one column per run."""
    tasks: dict[str, str] = {}
    for run in runs:
        for t in run["tasks"]:
            tasks.setdefault(t["task"], t["category"])
    lines = [
        "| Task | Cat | " + " | ".join(r["label"] for r in runs) + " |",
        "|---|---|" + "---:|" * len(runs),
    ]
    for name, cat in tasks.items():
        cells = []
        for run in runs:
            score = next((t["score"] for t in run["tasks"] if t["task"] == name), None)
            cells.append(_fmt(score))
        lines.append(f"| {name} | {cat} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out_dir: str | Path, run: dict[str, Any]) -> dict[str, Path]:
    """``scores.json`` (everything), ``results.md`` (paper table + per task), ``results.csv``
    (paper table) and ``tasks.csv`` (per task) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "scores.json",
        "md": out / "results.md",
        "csv": out / "results.csv",
        "tasks_csv": out / "tasks.csv",
    }
    paths["json"].write_text(json.dumps(run, indent=2))
    paths["md"].write_text(
        f"# {run['label']}\n\n{markdown_table([run])}\n\n## Per task\n\n{markdown_tasks([run])}\n"
    )
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", *COLUMNS, "Avg", "n_tasks", "avg_definition"])
        cats = run["categories"]
        w.writerow(
            [
                run["label"],
                *[("" if cats.get(c) is None else round(cats[c], 4)) for c in COLUMNS],
                round(run["avg"], 4) if run["avg"] is not None else "",
                run["n_tasks"],
                "mean over tasks",
            ]
        )
    with open(paths["tasks_csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "category", "main_score", "score"])
        for t in run["tasks"]:
            w.writerow([t["task"], t["category"], t["main_score"], round(t["score"], 4)])
    return paths


def load_run(path: str | Path) -> dict[str, Any]:
    """A run written by :func:`write_results` (its dir or ``scores.json``), or any directory of
    MTEB result JSON files (TaskResult), summarised here."""
    path = Path(path)
    if path.is_file():
        return json.loads(path.read_text())
    if (path / "scores.json").is_file():
        return json.loads((path / "scores.json").read_text())
    return _run_from_mteb_files(path)


def _run_from_mteb_files(path: Path) -> dict[str, Any]:
    from mteb import TaskResult

    rows = []
    for f in sorted(path.rglob("*.json")):
        try:
            data = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not (isinstance(data, dict) and "task_name" in data and "scores" in data):
            continue
        tr = TaskResult.from_disk(f)
        rows.append(
            {
                "task": tr.task_name,
                "category": _category_of(tr.task_name),
                "main_score": "main_score",
                "score": 100 * task_main_score(tr),
            }
        )
    if not rows:
        raise FileNotFoundError(f"{path}: no scores.json and no MTEB result files")
    return {"label": path.name, "tasks": rows, **summarize(rows)}


def _category_of(task_name: str) -> str:
    try:
        import mteb

        return CATEGORY_COLUMNS.get(mteb.get_task(task_name).metadata.type, "Other")
    except Exception:
        return "Other"
