"""Gather a sweep's runs into a table and the paper's comparison plots.

    python -m grace_lightning.sweeps.report <multirun dir | outputs dir> --out DIR [--metric M]
    python -m grace_lightning.sweeps.report --wandb <entity>/<project>/<sweep id> --out DIR

Offline, a run is any directory under the given path with ``.hydra/config.yaml`` from
``train.py``. The report reads the Hydra group choices (``.hydra/hydra.yaml``), the swept
overrides (``.hydra/overrides.yaml``), the last value of every metric in ``csv/**/metrics.csv``,
and the final evaluation's ``eval/scores.json``. Online (``--wandb``, needs the W&B API and
network), a run's config (its ``cfg`` and ``choices``), summary metrics and command-line
overrides come from ``wandb.Api()``; repeat ``--wandb`` to combine sweeps.

Written to ``--out``: ``runs.md`` and ``runs.csv`` (one row per run), and, when the runs vary
along the axis, ``sup_vs_unsup.png`` (GRACE per backbone, sup vs unsup), ``lambda_heatmap.png``
(λ1 x λ2), ``algorithms.png`` (one bar per RL algorithm) and ``baselines.png`` (GRACE vs
InfoNCE / SimCSE per backbone). Runs that share a plot cell (e.g. seeds) are averaged. A sweep of
``seed`` x one two-valued override (sweeps/pg_weight.yaml) also gets a seed-paired comparison of
the two arms in runs.md: per-seed differences, their mean and 95% t-interval.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from statistics import fmean
from typing import Any

from omegaconf import DictConfig, OmegaConf

from grace_lightning.eval.report import format_cell
from grace_lightning.eval.seeds import t_interval, verdict

# table columns that describe a run (then any other swept override, then the metrics)
ID_COLUMNS = [
    "run",
    "backbone",
    "method",
    "mode",
    "algo",
    "advantage",
    "lambda_consistency",
    "lambda_hard",
    "lr",
    "experiment",
]
METRIC_ORDER = ["eval/avg", "reward", "train/acc", "loss", "val/reward"]
METRIC_PREFERENCE = ["eval/avg", "reward", "train/acc"]  # --metric auto: the first one logged
SKIP_METRICS = {"epoch"}


# ---------------------------------------------------------------------------- gathering
def find_run_dirs(root: str | Path) -> list[Path]:
    """Training run dirs under ``root`` (``root`` included), in natural order."""
    root = Path(root)
    dirs = [p.parent.parent for p in root.rglob(".hydra/config.yaml")]
    return sorted(set(dirs), key=lambda p: _natural_key(str(p.relative_to(root))))


def _natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _select(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def last_metrics(run_dir: Path) -> dict[str, float]:
    """Last logged value of every numeric column of ``csv/**/metrics.csv`` (later versions win)."""
    files = sorted(
        run_dir.glob("csv/**/metrics.csv"), key=lambda p: _natural_key(str(p.relative_to(run_dir)))
    )
    out: dict[str, float] = {}
    for path in files:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key in SKIP_METRICS or value in (None, ""):
                        continue
                    try:
                        number = float(value)
                    except ValueError:
                        continue
                    out[key] = max(out.get(key, number), number) if key == "step" else number
    return out


def eval_metrics(run_dir: Path) -> dict[str, float]:
    """``eval/avg`` and ``eval/<category>`` from the final evaluation's ``eval/scores.json``."""
    path = run_dir / "eval" / "scores.json"
    if not path.is_file():
        return {}
    from grace_lightning.callbacks.final_eval import eval_metrics as from_summary

    return from_summary(json.loads(path.read_text()))


def _method(choices: dict[str, Any], cfg: DictConfig) -> str | None:
    if choices.get("method"):
        return str(choices["method"])
    target = str(_select(cfg, "model._target_") or "")
    if target.endswith("ContrastiveModule"):
        return _select(cfg, "model.objective")
    return "grace" if target.endswith("GraceModule") else None


def describe(cfg: DictConfig, choices: dict[str, Any]) -> dict[str, Any]:
    """The identifying fields of a run from its config and its Hydra group choices.

    ``algo``, ``advantage`` (the estimator's ``_target_``, from the run's own config: a user's
    estimator shows under its own name) and the λs only mean something for GRACE: None for the
    contrastive baselines.
    """
    method = _method(choices, cfg)
    grace = method == "grace"
    return {
        "backbone": choices.get("backbone") or _select(cfg, "backbone.name"),
        "method": method,
        "mode": _select(cfg, "reward.mode") or choices.get("reward"),  # sup | unsup data
        "algo": choices.get("algo") if grace else None,
        "advantage": advantage_target(_select(cfg, "algo.advantage")) if grace else None,
        "lambda_consistency": _select(cfg, "reward.lambda_consistency") if grace else None,
        "lambda_hard": _select(cfg, "reward.lambda_hard") if grace else None,
        "lr": _select(cfg, "optim.lr"),
        "experiment": choices.get("experiment"),
    }


def advantage_target(node: Any) -> str | None:
    """``algo.advantage`` of a run's config -> its ``_target_`` (runs from before estimators were
    ``_target_``s hold a short name: grpo, rloo, ...; shown as written)."""
    if isinstance(node, dict):
        return node.get("_target_")
    return None if node is None else str(node)


def algorithm_label(row: dict[str, Any]) -> str | None:
    """A GRACE run's bar in ``algorithms.png``: the ``algo=`` choice, and the estimator's
    ``_target_`` when it is not a built-in (``algo.advantage._target_=my_module.fn`` on top of an
    ``algo=`` preset is another algorithm)."""
    algo, target = row.get("algo"), row.get("advantage")
    if target and not str(target).startswith("grace_lightning.") and "." in str(target):
        return f"{algo or 'grpo'}: {target}"
    return algo


def parse_overrides(overrides: Iterable[str]) -> dict[str, str]:
    """``key=value`` overrides -> {key: value} (``+``/``++`` prefixes dropped; ``~key`` skipped)."""
    out = {}
    for o in overrides:
        if "=" in o and not o.startswith("~"):
            key, value = o.split("=", 1)
            out[key.lstrip("+")] = value
    return out


def offline_run(run_dir: Path, root: Path) -> dict[str, Any] | None:
    """One row from a run dir, or None if it is not a ``train.py`` run (e.g. an eval.py run)."""
    hydra_dir = run_dir / ".hydra"
    cfg = OmegaConf.load(hydra_dir / "config.yaml")
    if _select(cfg, "model._target_") is None:
        return None
    choices: dict[str, Any] = {}
    if (hydra_dir / "hydra.yaml").is_file():
        hydra_cfg = OmegaConf.load(hydra_dir / "hydra.yaml")
        choices = _select(hydra_cfg, "hydra.runtime.choices") or {}
    overrides = []
    if (hydra_dir / "overrides.yaml").is_file():
        overrides = list(OmegaConf.to_container(OmegaConf.load(hydra_dir / "overrides.yaml")))
    metrics = last_metrics(run_dir)
    metrics.update(eval_metrics(run_dir))
    name = str(run_dir.relative_to(root)) if run_dir != root else run_dir.name
    return {
        "run": name,
        "path": str(run_dir),
        **describe(cfg, choices),
        "overrides": parse_overrides(overrides),
        "finished": (run_dir / "export" / "config.json").is_file(),
        "metrics": metrics,
    }


def collect_offline(root: str | Path) -> list[dict[str, Any]]:
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such multirun or outputs directory")
    rows = [offline_run(d, root) for d in find_run_dirs(root)]
    return [r for r in rows if r is not None]


def collect_wandb(sweep_path: str) -> list[dict[str, Any]]:  # pragma: no cover - network
    """Rows from a W&B sweep through ``wandb.Api()``. NEEDS THE W&B SERVER (network, API key):
    it cannot run on the offline dev machines; tests cover the offline path only."""
    import wandb

    sweep = wandb.Api().sweep(sweep_path)
    rows = []
    for run in sweep.runs:
        args = list((run.metadata or {}).get("args") or [])  # the agent's command-line overrides
        overrides = parse_overrides(args)
        config = wandb_run_config(run.config)
        choices = {k: v for k, v in overrides.items() if "." not in k}  # group=option
        choices = {**choices, **config["choices"]}  # the Hydra choices the run logged
        cfg = OmegaConf.create(config["cfg"])
        metrics = {
            k: float(v)
            for k, v in run.summary.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and not k.startswith("_")
        }
        rows.append(
            {
                "run": run.name,
                "path": run.url,
                **describe(cfg, choices),
                "overrides": overrides,
                "finished": run.state == "finished",
                "metrics": metrics,
            }
        )
    return rows


def wandb_run_config(config: dict[str, Any]) -> dict[str, Any]:
    """``{"cfg": the resolved config, "choices": the Hydra group choices}`` of a W&B run's config:
    ``train.py`` logs them under ``cfg`` and ``choices`` (grace_lightning/utils/wandb.py), clear of
    the sweep parameters at the top level; a run logged before that had the groups at the top."""
    plain = _plain_config(config)
    if isinstance(plain.get("cfg"), dict):
        return {"cfg": plain["cfg"], "choices": dict(plain.get("choices") or {})}
    return {"cfg": plain, "choices": {}}


def _plain_config(config: dict[str, Any]) -> dict[str, Any]:
    """W&B config values may be wrapped as {"value": x, "desc": ...}; dotted keys are nested."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and set(value) <= {"value", "desc"}:
            value = value.get("value")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        if not isinstance(node.get(leaf), dict):
            node[leaf] = value
    return out


# ---------------------------------------------------------------------------- table
def swept_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Override keys whose values differ between runs and that no ID column already shows."""
    values: dict[str, set] = defaultdict(set)
    for r in rows:
        for k, v in r["overrides"].items():
            values[k].add(v)
    shown = {"backbone", "method", "reward", "algo", "experiment"}  # group choices
    shown |= {"algo.advantage", "algo.advantage._target_"}  # the advantage column
    shown |= {"reward.lambda_consistency", "reward.lambda_hard", "optim.lr"}
    return sorted(k for k, v in values.items() if len(v) > 1 and k not in shown)


def choose_metric(rows: list[dict[str, Any]], metric: str | None = None) -> str | None:
    if metric and metric != "auto":
        return metric
    for name in METRIC_PREFERENCE:
        if any(name in r["metrics"] for r in rows):
            return name
    return None


def table(rows: list[dict[str, Any]], metric: str | None) -> tuple[list[str], list[list[Any]]]:
    """(header, rows): ID columns, other swept overrides, then the metrics."""
    extra = swept_keys(rows)
    logged = {m for r in rows for m in r["metrics"]}
    eval_cats = sorted(m for m in logged if m.startswith("eval/") and m != "eval/avg")
    metrics = [m for m in [metric, *METRIC_ORDER, *eval_cats] if m and m in logged]
    metrics = list(dict.fromkeys(metrics))
    ids = [c for c in ID_COLUMNS if c == "run" or any(r.get(c) is not None for r in rows)]
    header = [*ids, *extra, *metrics, "finished"]
    body = [
        [
            *[r.get(c) for c in ids],
            *[r["overrides"].get(k) for k in extra],
            *[r["metrics"].get(m) for m in metrics],
            r["finished"],
        ]
        for r in rows
    ]
    return header, body


def _fmt(value: Any) -> str:
    return format_cell(value, ".4g")


def markdown(header: list[str], body: list[list[Any]], title: str, metric: str | None) -> str:
    lines = [f"# {title}", ""]
    if metric:
        lines += [f"Metric: `{metric}` (last logged value per run).", ""]
    if metric == "reward":
        lines += [
            "Rewards of different settings (sup vs unsup, λs, methods) are different functions:",
            "compare them with an embedding score (`eval=<suite>` -> `eval/avg`).",
            "",
        ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, header: list[str], body: list[list[Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows([["" if v is None else v for v in row] for row in body])


# ---------------------------------------------------------------------------- plots
def _mean_by(rows, keys: tuple[str, ...], metric: str) -> dict[tuple, float]:
    """Mean of ``metric`` per combination of ``keys`` (runs without the metric are left out)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        value = r["metrics"].get(metric)
        if value is not None and math.isfinite(value):
            groups[tuple(r.get(k) for k in keys)].append(value)
    return {k: sum(v) / len(v) for k, v in groups.items()}


def _grouped_bars(ax, groups: list, series: list, values: dict[tuple, float]) -> None:
    width = 0.8 / max(1, len(series))
    for j, s in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))]
        ys = [values.get((g, s), float("nan")) for g in groups]
        bars = ax.bar(xs, ys, width, label=str(s))
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(range(len(groups)), [str(g) for g in groups])


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bar_figure(groups, series, values, metric, title, legend_title, path, width) -> Path:
    """Grouped bars (one group per backbone), saved to ``path``."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(max(4.8, 1.8 + width * len(groups)), 3.6))
    _grouped_bars(ax, groups, series, values)
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.legend(title=legend_title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sup_vs_unsup(rows, metric: str, path: Path) -> Path | None:
    """GRACE runs per backbone, one bar per reward mode (sup, unsup)."""
    grace = [r for r in rows if r.get("method") == "grace"]
    values = _mean_by(grace, ("backbone", "mode"), metric)
    modes = sorted({k[1] for k in values if k[1]})
    if len(modes) < 2:
        return None
    backbones = sorted({k[0] for k in values}, key=str)
    return _bar_figure(backbones, modes, values, metric, "GRACE: sup vs unsup", "reward", path, 1.4)


def plot_lambda_heatmap(rows, metric: str, path: Path) -> Path | None:
    """GRACE runs on the λ1 (consistency) x λ2 (hard) grid; cells show the mean metric.
    Continuous searches (Optuna: many distinct values) get a scatter instead."""
    grace = [r for r in rows if r.get("method") == "grace"]
    values = _mean_by(grace, ("lambda_consistency", "lambda_hard"), metric)
    values = {k: v for k, v in values.items() if None not in k}
    l1 = sorted({k[0] for k in values})
    l2 = sorted({k[1] for k in values})
    if len(l1) < 2 and len(l2) < 2:
        return None
    if len(l1) * len(l2) > 2 * len(values) and len(values) > 6:
        return _lambda_scatter(values, metric, path)
    import numpy as np

    grid = np.full((len(l1), len(l2)), np.nan)
    for (a, b), v in values.items():
        grid[l1.index(a), l2.index(b)] = v
    plt = _figure()
    fig, ax = plt.subplots(figsize=(max(4.8, 1.6 + 0.9 * len(l2)), max(3.2, 1.2 + 0.8 * len(l1))))
    im = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
    for i in range(len(l1)):
        for j in range(len(l2)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3g}", ha="center", va="center", color="w", fontsize=8)
    ax.set_xticks(range(len(l2)), [f"{v:g}" for v in l2])
    ax.set_yticks(range(len(l1)), [f"{v:g}" for v in l1])
    ax.set_xlabel("λ2 (reward.lambda_hard)")
    ax.set_ylabel("λ1 (reward.lambda_consistency)")
    ax.set_title(f"GRACE reward weights: {metric}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _lambda_scatter(values: dict[tuple, float], metric: str, path: Path) -> Path:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    (l1, l2), v = zip(*values), list(values.values())
    sc = ax.scatter(l2, l1, c=v, cmap="viridis", s=60)
    ax.set_xlabel("λ2 (reward.lambda_hard)")
    ax.set_ylabel("λ1 (reward.lambda_consistency)")
    ax.set_title(f"GRACE reward weights: {metric}")
    fig.colorbar(sc, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_algorithms(rows, metric: str, path: Path) -> Path | None:
    """GRACE runs, one bar per RL algorithm (``algo=``, or the estimator's ``_target_`` when it
    is a user's, `algorithm_label`), in the order the runs came (a sweep's own order)."""
    grace = [
        {**r, "algorithm": algorithm_label(r)}
        for r in rows
        if r.get("method") == "grace" and algorithm_label(r)
    ]
    values = _mean_by(grace, ("algorithm",), metric)
    if len(values) < 2:
        return None
    algos = list(dict.fromkeys(r["algorithm"] for r in grace if (r["algorithm"],) in values))
    plt = _figure()
    fig, ax = plt.subplots(figsize=(max(4.8, 1.6 + 1.0 * len(algos)), 3.4))
    bars = ax.bar(range(len(algos)), [values[(a,)] for a in algos], color="tab:blue")
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_xticks(range(len(algos)), algos)
    ax.set_ylabel(metric)
    ax.set_title("GRACE: RL algorithm")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_baselines(rows, metric: str, path: Path) -> Path | None:
    """Per backbone, one bar per method and setting (GRACE sup/unsup, infonce, simcse)."""
    labelled = [
        {**r, "series": r["method"] if r.get("method") != "grace" else f"grace ({r.get('mode')})"}
        for r in rows
    ]
    values = _mean_by(labelled, ("backbone", "series"), metric)
    series = sorted({k[1] for k in values if k[1]}, key=str)
    if len({r.get("method") for r in rows if r.get("method")}) < 2 or not series:
        return None
    backbones = sorted({k[0] for k in values}, key=str)
    title = "GRACE vs contrastive baselines"
    return _bar_figure(backbones, series, values, metric, title, "method", path, 1.6)


PLOTS = {
    "sup_vs_unsup.png": plot_sup_vs_unsup,
    "lambda_heatmap.png": plot_lambda_heatmap,
    "algorithms.png": plot_algorithms,
    "baselines.png": plot_baselines,
}


# ---------------------------------------------------------------------------- seed-paired arms
def seed_paired(rows: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """A - B over seeds, when the runs sweep ``seed`` and exactly one other override with two
    values (the arms, A the value that came first; e.g. sweeps/pg_weight.yaml's
    ``algo.pg_weight=1,0``): per seed the difference of the two runs' ``metric`` (runs of one
    cell averaged), their mean and its 95% t-interval (`eval/seeds.py`, as study v3's claims).
    None when the runs are not such a grid."""
    values: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        for k, v in r["overrides"].items():
            if v not in values[k]:
                values[k].append(v)
    varying = [k for k, v in values.items() if len(v) > 1]
    arms = [k for k in varying if k != "seed"]
    if "seed" not in varying or len(arms) != 1 or len(values[arms[0]]) != 2:
        return None
    key, (a, b) = arms[0], values[arms[0]]
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        o, value = r["overrides"], r["metrics"].get(metric)
        if value is not None and math.isfinite(value) and key in o and "seed" in o:
            cells[(o[key], o["seed"])].append(float(value))
    seeds = [s for s in values["seed"] if (a, s) in cells and (b, s) in cells]
    per_seed = {s: (fmean(cells[(a, s)]), fmean(cells[(b, s)])) for s in seeds}
    diffs = [va - vb for va, vb in per_seed.values()]
    ci = t_interval(diffs)
    return {
        "key": key,
        "a": a,
        "b": b,
        "metric": metric,
        "per_seed": per_seed,
        "mean": fmean(diffs) if diffs else None,
        "ci": ci,
        "verdict": verdict(ci) if diffs else "no seed has both arms yet",
    }


def seed_paired_markdown(p: dict[str, Any]) -> str:
    a, b = f"{p['key']}={p['a']}", f"{p['key']}={p['b']}"
    lines = [
        f"## Seed-paired: `{a}` - `{b}`",
        "",
        f"| seed | `{a}` | `{b}` | A - B |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {s} | {va:.2f} | {vb:.2f} | {va - vb:+.2f} |" for s, (va, vb) in p["per_seed"].items()
    ]
    if p["mean"] is not None:
        ci = p["ci"]
        ci_txt = f" [{ci[0]:+.2f}, {ci[1]:+.2f}] (95% t-interval over seeds)" if ci else ""
        lines += [
            "",
            f"`{p['metric']}`, A - B over {len(p['per_seed'])} seed(s): {p['mean']:+.2f}{ci_txt}. "
            f'"`{a}` beats `{b}`": {p["verdict"]}.',
        ]
    else:
        lines += ["", p["verdict"] + "."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- entry point
def build_report(
    rows: list[dict[str, Any]], out: str | Path, metric: str | None = None, title: str = "Sweep"
) -> dict[str, Any]:
    """Write runs.md, runs.csv and the plots that apply into ``out``; return what was written."""
    if not rows:
        raise ValueError("no training runs found (directories with .hydra/config.yaml)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metric = choose_metric(rows, metric)
    header, body = table(rows, metric)
    paired = seed_paired(rows, metric) if metric else None
    text = markdown(header, body, title, metric)
    if paired:
        text += "\n" + seed_paired_markdown(paired)
    (out / "runs.md").write_text(text)
    write_csv(out / "runs.csv", header, body)
    plots = []
    if metric:
        plots = [p for name, fn in PLOTS.items() if (p := fn(rows, metric, out / name))]
    return {
        "metric": metric,
        "runs": len(rows),
        "table": out / "runs.md",
        "csv": out / "runs.csv",
        "plots": plots,
        "paired": paired,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Gather a sweep's runs into a table and plots.")
    parser.add_argument("path", nargs="?", help="a Hydra multirun dir or an outputs dir")
    parser.add_argument(
        "--wandb",
        metavar="ENTITY/PROJECT/SWEEP_ID",
        action="append",
        help="read a W&B sweep (repeat to combine sweeps, e.g. with sweeps/qwen3_fsdp.yaml's)",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--metric", default="auto", help="metric to plot (auto: eval/avg, reward)")
    args = parser.parse_args(argv)
    if not args.path and not args.wandb:
        parser.error("give a multirun/outputs dir, --wandb, or both")
    rows = collect_offline(args.path) if args.path else []
    for sweep in args.wandb or []:
        rows += collect_wandb(sweep)
    title = " + ".join(args.wandb or []) or str(args.path)
    result = build_report(rows, args.out, args.metric, title=f"Sweep report: {title}")
    print((Path(args.out) / "runs.md").read_text(), flush=True)
    print(f"{result['runs']} runs, metric {result['metric']}: {result['table']} | {result['csv']}")
    for p in result["plots"]:
        print(f"plot: {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
