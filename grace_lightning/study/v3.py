"""Study v3 (``conf/study_v3.yaml``, issue 19): arms x training seeds, an lr sweep chosen on dev,
schedules sized to the budget, seed-level intervals paired by seed, and the claims the study
answers.

Config keys on top of v2's (``conf/study.yaml``):

- ``seeds: [0, 1, 2]``: every trained row (an *arm*) and every row that evaluates one
  (``eval_of``) runs once per seed, as ``<arm>/seed<s>`` (its own dirs under ``out_dir``;
  ``seed=<s>`` appended to its training). A row that starts from another (``init_from``) or
  evaluates another (``eval_of``) uses that row's run of the SAME seed: differences are paired by
  seed. Untrained rows (Base, w/ reasoning) run once.
- ``sweeps.<name>``: ``{group, train, lrs, seed, dev_overrides, metric}``: one training per lr
  (seed ``seed``), scored by the LAST logged ``metric`` of its run (the dev callback at the end
  of training, on ``dev_overrides``' data); a row with ``lr_from: <name>`` trains with the best
  lr. The sweep runs first; its choice is written to ``<out_dir>/sweeps/<name>/chosen.json``.
- The contrastive rows train until the budget ends (``contrastive_overrides``: no step or epoch
  cap), and their linear lr decay ends with it: ``ContrastiveModule``'s schedule follows the
  fraction of ``trainer.max_time`` left, whatever the machine's speed.
- Run order is seed-major: the sweeps, the untrained rows, then every arm of seed 0, then of seed
  1, ...: a seed's arms run back to back (on one machine, when a study spans sessions), so a
  seed-paired difference compares runs of the same conditions. ``DONE.json`` records the CPU.
- ``primary: {name, tasks}``: the metric fixed before the run (mean main score over ``tasks``).
- ``claims``: ``[{name, a, b}]``: "arm a beats arm b" on the primary metric, judged by the
  seed-level interval of the paired differences.
- ``eval_minutes_estimate.{train_startup,eval_startup}``: per-stage overheads for the estimate.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from grace_lightning.eval.seeds import t_interval, verdict
from grace_lightning.study.common import DONE, read_metrics, row_minutes

SEP = "/seed"


def _plain(node: Any) -> Any:
    """A config node as plain containers (None stays None)."""
    if node is None:
        return None
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def seeds_of(cfg: DictConfig) -> list[int]:
    return [int(s) for s in _plain(cfg.get("seeds")) or []]


def is_seeded(row: Mapping[str, Any]) -> bool:
    return row.get("train") is not None or row.get("eval_of") is not None


def arm_of(name: str) -> tuple[str, int | None]:
    """``"infonce/seed1"`` -> ``("infonce", 1)``; an unseeded row -> ``(name, None)``."""
    if SEP in name:
        arm, s = name.rsplit(SEP, 1)
        return arm, int(s)
    return name, None


def expand_seeds(cfg: DictConfig, rows: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Rows -> row instances, one per seed for trained / eval_of rows (see module doc)."""
    seeds = seeds_of(cfg)
    if not seeds:
        return dict(rows)
    out: dict[str, dict[str, Any]] = {
        name: dict(row) for name, row in rows.items() if not is_seeded(row)
    }
    for s in seeds:  # seed-major: every arm of seed 0 (in dependency order), then seed 1, ...
        for name, row in rows.items():
            if not is_seeded(row):
                continue
            inst = dict(row)
            inst["arm"], inst["seed"] = name, s
            inst["label"] = f"{row['label']} (seed {s})"
            if row.get("train") is not None:
                inst["train"] = [*row["train"], f"seed={s}"]
            for key in ("init_from", "eval_of"):
                if row.get(key) is not None:
                    inst[key] = f"{row[key]}{SEP}{s}"
            out[f"{name}{SEP}{s}"] = inst
    return out


# ---------------------------------------------------------------------------- lr sweeps
def sweep_rows(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """The sweep's training rows: ``sweeps/<name>/lr<lr>`` (trained, never evaluated)."""
    out = {}
    for name, sw in (_plain(cfg.get("sweeps")) or {}).items():
        for lr in sw["lrs"]:
            out[f"sweeps/{name}/lr{lr:g}"] = {
                "label": f"{name} sweep, lr {lr:g}",
                "tables": [],
                "group": sw["group"],
                "train": [*sw["train"], f"optim.lr={lr}", f"seed={int(sw.get('seed', 0))}"],
                "dev_overrides": [str(o) for o in sw.get("dev_overrides") or []],
                "eval": {"mode": "none"},
                "sweep": name,
                "lr": float(lr),
            }
    return out


def last_metric(train_dir: Path, key: str) -> float | None:

    values = [
        m[key] for m in read_metrics(train_dir) if key in m and math.isfinite(m[key])
    ]  # in logged order; the last is the end-of-training score
    return values[-1] if values else None


def chosen_lr(cfg: DictConfig, sweep: str, write: bool = False) -> float | None:
    """The sweep's best lr by its ``metric`` (higher is better), or None until every sweep run
    has finished and logged it. ``write``: record the choice in ``sweeps/<name>/chosen.json``."""

    sw = cfg.sweeps[sweep]
    metric = str(sw.get("metric", "val/dev_avg"))
    out = Path(cfg.out_dir)
    scores = {}
    for name, row in sweep_rows(cfg).items():
        if row["sweep"] != sweep:
            continue
        train_dir = out / name / "train"
        if not (train_dir / DONE).is_file():
            return None
        scores[row["lr"]] = last_metric(train_dir, metric)
    valid = {lr: s for lr, s in scores.items() if s is not None}
    if not valid:
        return None
    best = max(valid, key=lambda lr: valid[lr])
    if write:
        path = out / "sweeps" / sweep / "chosen.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps({"metric": metric, "scores": scores, "chosen_lr": best}, indent=2) + "\n"
        )
    return best


# ---------------------------------------------------------------------------- estimate
def estimate_minutes(cfg: DictConfig, rows: Mapping[str, Any]) -> dict[str, float]:
    """Planned wall time of ``rows`` (instances) and the sweeps: training budgets, evaluations
    (``eval_minutes_estimate`` per mode) and per-stage start-up overheads."""

    est = dict(cfg.get("eval_minutes_estimate") or {})
    t_start, e_start = float(est.get("train_startup", 0)), float(est.get("eval_startup", 0))
    train = evals = overhead = 0.0
    all_rows = {**sweep_rows(cfg), **rows}
    for row in all_rows.values():
        if row.get("train") is not None:
            train += row_minutes(cfg, row) or 0.0
            overhead += t_start
        mode = row["eval"]["mode"]
        if mode != "none":
            evals += float(est.get(mode, 0) or 0)
            overhead += e_start
    return {"train": train, "eval": evals, "overhead": overhead, "total": train + evals + overhead}


def arms_lines(cfg: DictConfig, rows: Mapping[str, Any]) -> list[str]:
    """Arms, their seeds and budget (``dry_run`` prints these)."""

    seeds = seeds_of(cfg)
    lines = [f"Seeds: {seeds or '(one run per row)'}"]
    arms: dict[str, dict[str, Any]] = {}
    for name, row in rows.items():
        arm, s = arm_of(name)
        a = arms.setdefault(arm, {"row": row, "seeds": []})
        if s is not None:
            a["seeds"].append(s)
    lines.append(f"{'arm':<22} {'seeds':<12} {'train min':>9} {'eval':>9}  from")
    for arm, a in arms.items():
        row = a["row"]
        mins = row_minutes(cfg, row) if row.get("train") is not None else 0.0
        src = row.get("init_from") or row.get("eval_of") or "-"
        lines.append(
            f"{arm:<22} {','.join(map(str, a['seeds'])) or '-':<12} {mins or 0:>9.1f} "
            f"{row['eval']['mode']:>9}  {arm_of(src)[0]}"
        )
    for name, sw in (_plain(cfg.get("sweeps")) or {}).items():
        lines.append(
            f"sweep {name}: lr in {sw['lrs']} (seed {sw.get('seed', 0)}), chosen by the last "
            f"{sw.get('metric', 'val/dev_avg')}; chosen: {chosen_lr(cfg, name)}"
        )
    e = estimate_minutes(cfg, rows)
    lines.append(
        f"Estimated total: {e['total']:.0f} min = {e['total'] / 60:.1f} h (training "
        f"{e['train']:.0f}, evaluation {e['eval']:.0f}, stage start-up {e['overhead']:.0f})"
    )
    return lines


# ------------------------------------------------------------ seed tables (eval/seeds.py intervals)
def primary_score(run: Mapping[str, Any] | None, tasks: Sequence[str]) -> float | None:
    """Mean main score x100 over ``tasks`` (all must be present), else None."""
    if run is None:
        return None
    scores = {t["task"]: t["score"] for t in run["tasks"]}
    if not all(t in scores for t in tasks):
        return None
    return float(np.mean([scores[t] for t in tasks]))


def primary_bootstrap(
    a: Mapping[str, Any],
    b: Mapping[str, Any] | None,
    tasks: Sequence[str],
    n: int,
    seed: int,
    level: float,
) -> tuple[float, float] | None:
    """Per-example paired-bootstrap interval of the primary metric of record ``a`` (or of
    ``a - b``), from the records' per-example data (STS pairs)."""
    from grace_lightning.eval.bootstrap import avg_replicates, percentile_interval

    def reps(r):
        scores = {t["task"]: t["score"] for t in r["run"]["tasks"] if t["task"] in tasks}
        ex = {t: e for t, e in (r.get("examples") or {}).items() if t in tasks}
        return avg_replicates(ex, scores, n, seed)

    if a["run"] is None or (b is not None and b["run"] is None):
        return None
    d = reps(a) - (reps(b) if b is not None else 0.0)
    return percentile_interval(d, level)


def seed_tables(cfg: DictConfig, records: Sequence[Mapping[str, Any]]) -> tuple[str, dict]:
    """Markdown: per-arm primary metric over seeds (mean, t-interval, each seed with its
    per-example interval), each arm's paired difference to its table's reference arm, and the
    claims. Returns (markdown, json-able summary)."""
    p = cfg.get("primary") or {}
    tasks = [str(t) for t in p.get("tasks") or []]
    pname = str(p.get("name") or "primary")
    bcfg = dict(cfg.get("bootstrap") or {})
    n, bseed, level = (
        int(bcfg.get("n", 1000)),
        int(bcfg.get("seed", 0)),
        float(bcfg.get("level", 0.95)),
    )
    by_arm: dict[str, dict[int | None, Mapping[str, Any]]] = {}
    labels: dict[str, str] = {}
    for r in records:
        arm, s = arm_of(r["name"])
        by_arm.setdefault(arm, {})[s] = r
        labels[arm] = r["label"].rsplit(" (seed ", 1)[0]
    summary: dict[str, Any] = {"primary": {"name": pname, "tasks": tasks}, "arms": {}, "claims": []}
    lines = [
        f"| Arm | seeds | {pname}: mean over seeds [95% t-interval] | per seed [per-example 95% CI] |",
        "|---|---:|---:|---|",
    ]
    for arm, runs in by_arm.items():
        vals = {s: primary_score(r["run"], tasks) for s, r in runs.items()}
        done = {s: v for s, v in vals.items() if v is not None}
        if not done:
            continue
        ci = t_interval(list(done.values()), level)
        per_seed = []
        for s, v in sorted(done.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
            b = primary_bootstrap(runs[s], None, tasks, n, bseed, level)
            tag = "" if s is None else f"s{s}: "
            per_seed.append(f"{tag}{v:.2f} [{b[0]:.2f}, {b[1]:.2f}]" if b else f"{tag}{v:.2f}")
        mean = float(np.mean(list(done.values())))
        summary["arms"][arm] = {
            "seeds": {str(s): v for s, v in done.items()},
            "mean": mean,
            "ci": ci,
        }
        ci_txt = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
        lines.append(
            f"| {labels[arm]} | {len(done)} | **{mean:.2f}**{ci_txt} | {'; '.join(per_seed)} |"
        )
    claim_lines = [
        f"| Claim | A - B ({pname}), mean over seeds [95% t-interval over seed-paired differences] | per seed: A - B [per-example paired 95% CI] | Verdict |",
        "|---|---:|---|---|",
    ]
    for c in _plain(cfg.get("claims")) or []:
        a_runs, b_runs = by_arm.get(c["a"], {}), by_arm.get(c["b"], {})
        diffs, cells = [], []
        for s in sorted(k for k in a_runs if k is not None):
            ra = a_runs.get(s)
            rb = b_runs.get(s, b_runs.get(None))  # an unseeded B (Base) pairs with every seed
            va, vb = (
                primary_score(ra["run"], tasks),
                primary_score(rb["run"], tasks) if rb else None,
            )
            if va is None or vb is None:
                continue
            diffs.append(va - vb)
            bi = primary_bootstrap(ra, rb, tasks, n, bseed, level)
            cells.append(f"s{s}: {va - vb:+.2f}" + (f" [{bi[0]:+.2f}, {bi[1]:+.2f}]" if bi else ""))
        ci = t_interval(diffs, level)
        v = verdict(ci) if diffs else "not run yet"
        summary["claims"].append(
            {"name": c["name"], "a": c["a"], "b": c["b"], "diffs": diffs, "ci": ci, "verdict": v}
        )
        mean = f"{np.mean(diffs):+.2f}" if diffs else "–"
        ci_txt = f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""
        claim_lines.append(
            f"| {c['name']} ({labels.get(c['a'], c['a'])} vs {labels.get(c['b'], c['b'])}) | "
            f"{mean}{ci_txt} | {'; '.join(cells) or '–'} | {v} |"
        )
    md = (
        f"**Primary metric** (fixed before the run): {pname} = mean Spearman x100 over "
        f"{', '.join(tasks)}.\n\n" + "\n".join(lines) + "\n\n**Claims** (a claim holds when the "
        "seed-level interval of the seed-paired differences excludes 0; the per-example "
        "bootstrap inside each seed is shown next to it)\n\n" + "\n".join(claim_lines)
    )
    return md, summary
