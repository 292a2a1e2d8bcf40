"""Several evaluation runs side by side: the paper's table (markdown) and a grouped bar chart.

    python -m grace_lightning.eval.compare outputs/eval/runs/A outputs/eval/runs/B ... --out cmp
    python -m grace_lightning.eval.compare base/ reasoning/ grace/ --labels Base "w/ reasoning" GRACE

Each argument is an ``eval.py`` run dir (its ``scores.json``) or any directory of MTEB result
JSON files. Rows follow the order given, like the paper's Base / w/ reasoning / GRACE rows
(Table 1). Writes ``<out>.md`` (category table + per-task table) and ``<out>.png``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from grace_lightning.eval.report import COLUMNS, load_run, markdown_table, markdown_tasks, summarize


def load_runs(paths: Sequence[str | Path], labels: Sequence[str] | None = None) -> list[dict]:
    runs = [load_run(p) for p in paths]
    if labels:
        if len(labels) != len(runs):
            raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
        for run, label in zip(runs, labels):
            run["label"] = label
    return runs


def common_tasks(runs: list[dict]) -> list[dict]:
    """Restrict every run to the tasks all runs have, so the averages compare like with like."""
    shared = set.intersection(*({t["task"] for t in r["tasks"]} for r in runs))
    out = []
    for run in runs:
        rows = [t for t in run["tasks"] if t["task"] in shared]
        out.append({**run, "tasks": rows, **summarize(rows)})
    return out


def bar_chart(runs: list[dict], path: str | Path, title: str = "MTEB by category") -> Path:
    """Grouped bars: one group per category present in any run (+ Avg), one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = [c for c in COLUMNS if any(r["categories"].get(c) is not None for r in runs)]
    cols.append("Avg")
    x = np.arange(len(cols))
    width = 0.8 / max(len(runs), 1)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(cols) * max(1, len(runs) / 3), 4))
    for i, run in enumerate(runs):
        vals = [run["avg"] if c == "Avg" else run["categories"].get(c) for c in cols]
        vals = [np.nan if v is None else v for v in vals]
        bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, vals, width, label=run["label"])
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(x, cols)
    ax.set_ylabel("score (MTEB main score x100)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare(
    paths: Sequence[str | Path],
    out: str | Path,
    labels: Sequence[str] | None = None,
    only_common: bool = False,
) -> dict[str, Any]:
    """Write ``<out>.md`` and ``<out>.png``; return the runs and the markdown."""
    runs = load_runs(paths, labels)
    if only_common:
        runs = common_tasks(runs)
    out = Path(out)
    counts = ", ".join(f"{r['label']}: {r['n_tasks']}" for r in runs)
    md = (
        f"{markdown_table(runs, note=False)}\n\n"
        f"Avg = unweighted mean over each run's tasks (not the mean of the columns); "
        f"task counts: {counts}.\n\n"
        f"## Per task\n\n{markdown_tasks(runs)}\n"
    )
    md_path = out.with_suffix(".md")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(md)
    png = bar_chart(runs, out.with_suffix(".png"))
    return {"runs": runs, "markdown": md, "md_path": md_path, "png_path": png}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "dirs", nargs="+", help="eval.py run dirs (scores.json) or MTEB result dirs"
    )
    parser.add_argument("--out", default="comparison", help="output path without suffix")
    parser.add_argument("--labels", nargs="+", help="row labels, one per dir")
    parser.add_argument(
        "--common", action="store_true", help="score only the tasks that every run has"
    )
    args = parser.parse_args(argv)
    res = compare(args.dirs, args.out, args.labels, args.common)
    print(res["markdown"])
    print(f"wrote {res['md_path']} and {res['png_path']}")


if __name__ == "__main__":
    main()
