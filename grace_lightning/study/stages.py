"""Resumable study stages (``conf/study.yaml``): each row runs [train ->] eval [-> samples].

A stage is a ``train.py`` / ``eval.py`` subprocess with a fixed run dir, so a crash, a kill or
an out-of-memory in one stage never takes the study's bookkeeping with it, and each stage's own
resume path applies: training restarts from ``checkpoints/last.ckpt`` (``ckpt_path=last``),
evaluation skips mteb's finished tasks and reuses the run's rationale cache. A stage that exits 0
gets ``DONE.json`` (command, wall seconds of every attempt); a rerun skips it.

Layout under ``out_dir``::

    <row>/train/     train.py run dir (metrics.csv, rationales.jsonl, checkpoints/, export/)
    <row>/eval/      eval.py run dir (scores.json, results.md, mteb/, rationales.sqlite)
    <row>/samples.json   rationales for conf ``samples.texts`` (rationale rows only)
    <row>/general/   general-capability proxy (general.json: perplexity, instruction accuracy)

Study v2 (``conf/study.yaml``): the evaluation stage is :mod:`grace_lightning.study.eval_stage`
(``eval.py`` + per-example data for the paired bootstrap, ``per_example.json``); a row may start
from another row's export (``init_from: <row>``: that row's stages run first, also under
``only``); every trained row gets the same wall-time budget (``train_minutes`` -> Lightning
``trainer.max_time``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from grace_lightning.study.common import DONE, REPO_ROOT, row_minutes  # noqa: F401 (re-exported)
from grace_lightning.utils.atomic import atomic_write

log = logging.getLogger(__name__)

ATTEMPTS = "attempts.jsonl"
ROW_KEYS = {
    "label",
    "tables",
    "group",
    "train",
    "eval",
    "init_from",
    "minutes",
    "eval_of",
    "lr_from",
}
TABLES = ("sup", "unsup")
GROUPS = ("grace", "contrastive")
MODES = ("base", "rationale", "echo")  # echo: the text as its own rationale (eval/encoder.py)


class StudyConfigError(ValueError):
    """A row of ``conf/study.yaml`` that cannot run; the message names the key to change."""


class StageFailed(RuntimeError):
    """A stage's subprocess exited non-zero; the message names its log."""


@dataclass
class Stage:
    row: str
    kind: str  # train | eval | samples | general
    dir: Path  # run dir (train/eval) or the row dir (samples)
    argv: list[str] = field(default_factory=list)  # subprocess command (train/eval)
    # () -> argv, called right before the stage runs (v3: an lr chosen by a sweep run earlier)
    rebuild: Any = None

    @property
    def done_file(self) -> Path:
        if self.kind == "samples":
            return self.dir / "samples.json"
        return self.dir / DONE

    @property
    def done(self) -> bool:
        return self.done_file.is_file()

    @property
    def log_file(self) -> Path:
        return self.dir / "stage.log"


# ---------------------------------------------------------------------------- config
def check_rows(rows: Mapping[str, Any]) -> None:
    """Validate ``rows`` before anything runs: every problem names ``rows.<name>.<field>``."""
    if not rows:
        raise StudyConfigError("conf/study.yaml: `rows` is empty; add at least one row")
    for name, row in rows.items():
        where = f"conf/study.yaml rows.{name}"
        if not isinstance(row, Mapping):
            raise StudyConfigError(f"{where}: expected a mapping with label/tables/eval")
        unknown = set(row) - ROW_KEYS
        if unknown:
            raise StudyConfigError(
                f"{where}: unknown field(s) {sorted(unknown)}; use {sorted(ROW_KEYS)}"
            )
        if not row.get("label"):
            raise StudyConfigError(f"{where}.label: missing (the table's row name)")
        tables = list(row.get("tables") or [])
        if not tables or any(t not in TABLES for t in tables):
            raise StudyConfigError(
                f"{where}.tables: {tables!r}; use a non-empty subset of {list(TABLES)}"
            )
        ev = row.get("eval")
        if not isinstance(ev, Mapping) or ev.get("mode") not in MODES:
            raise StudyConfigError(
                f"{where}.eval.mode: {None if not ev else ev.get('mode')!r}; use one of {list(MODES)}"
            )
        if row.get("train") is not None:
            if row.get("group") not in GROUPS:
                raise StudyConfigError(
                    f"{where}.group: {row.get('group')!r}; a trained row needs one of {list(GROUPS)}"
                )
            if not isinstance(row["train"], list | tuple) or not all(
                isinstance(o, str) for o in row["train"]
            ):
                raise StudyConfigError(
                    f"{where}.train: a list of train.py overrides, e.g. [reward=sup]"
                )
            if ev.get("model") not in (None, "run"):
                raise StudyConfigError(
                    f"{where}.eval.model: a trained row is evaluated on its own run; drop `model`"
                )
        elif (
            row.get("init_from") is not None
            or row.get("minutes") is not None
            or row.get("lr_from") is not None
        ):
            raise StudyConfigError(
                f"{where}: init_from / minutes / lr_from need a trained row (set `train` and `group`)"
            )
        src = row.get("eval_of")
        if src is not None:
            if row.get("train") is not None:
                raise StudyConfigError(
                    f"{where}.eval_of: a trained row evaluates its own run; drop eval_of or train"
                )
            if src not in rows or src == name or rows[src].get("train") is None:
                raise StudyConfigError(
                    f"{where}.eval_of: {src!r} is not another trained row; use one of "
                    f"{[n for n, r in rows.items() if n != name and r.get('train') is not None]}"
                )
        if row.get("minutes") is not None and not float(row["minutes"]) > 0:
            raise StudyConfigError(f"{where}.minutes: {row['minutes']!r}; a positive number")
        dep = row.get("init_from")
        if dep is not None:
            if dep not in rows or dep == name:
                raise StudyConfigError(
                    f"{where}.init_from: {dep!r} is not another row; use one of "
                    f"{[n for n in rows if n != name]}"
                )
            if rows[dep].get("train") is None:
                raise StudyConfigError(
                    f"{where}.init_from: row {dep!r} trains nothing (no export to start from)"
                )
            seen = {name}
            while dep is not None:
                if dep in seen:
                    raise StudyConfigError(f"{where}.init_from: a cycle through {sorted(seen)}")
                seen.add(dep)
                dep = rows.get(dep, {}).get("init_from")


def selected_rows(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """The rows to run (``only`` + the rows they need), in dependency order; with ``seeds``
    (study v3) one instance per seed of every trained / ``eval_of`` row (``<row>/seed<s>``)."""
    from grace_lightning.study.v3 import expand_seeds

    rows = OmegaConf.to_container(cfg.rows, resolve=True)
    check_rows(rows)
    sweeps = set(cfg.get("sweeps") or {})
    for name, row in rows.items():
        if row.get("lr_from") is not None and row["lr_from"] not in sweeps:
            raise StudyConfigError(
                f"rows.{name}.lr_from: {row['lr_from']!r} is not a sweep; sweeps are {sorted(sweeps)}"
            )
    only = list(cfg.get("only") or [])
    missing = [n for n in only if n not in rows]
    if missing:
        raise StudyConfigError(f"only={missing}: no such row(s); rows are {list(rows)}")
    wanted = set(only or rows)
    todo = list(wanted)
    while todo:  # a row needs the rows it starts from / evaluates
        n = todo.pop()
        for key in ("init_from", "eval_of"):
            dep = rows[n].get(key)
            if dep is not None and dep not in wanted:
                wanted.add(dep)
                todo.append(dep)
    ordered = dependency_order({n: r for n, r in rows.items() if n in wanted})
    return expand_seeds(cfg, ordered)


def dependency_order(rows: Mapping[str, Any]) -> dict[str, Any]:
    """``rows`` in config order, except that a row comes after the row it starts from."""
    out: dict[str, Any] = {}

    def add(n: str) -> None:
        if n in out:
            return
        for key in ("init_from", "eval_of"):
            dep = rows[n].get(key)
            if dep is not None and dep in rows:
                add(dep)
        out[n] = rows[n]

    for n in rows:
        add(n)
    return out


# ---------------------------------------------------------------------------- commands
def _list(cfg: DictConfig, key: str) -> list[str]:
    value = cfg.get(key)
    if value is None:  # a key that this config version lacks (v1: speedups, dev_overrides)
        return []
    return [str(o) for o in (OmegaConf.to_container(value, resolve=True) or [])]


def _train_groups() -> set[str]:
    """Config groups in ``conf/train.yaml``'s defaults list (``dev`` may not be one)."""
    groups = set()
    for entry in OmegaConf.load(REPO_ROOT / "conf" / "train.yaml").get("defaults", []):
        if isinstance(entry, Mapping) or hasattr(entry, "keys"):
            groups.update(str(k).split("@")[0].removeprefix("override ") for k in entry)
    return groups


def _append_groups(overrides: list[str]) -> list[str]:
    """``<group>=<option>`` for a conf group that train.yaml's defaults lack -> ``+<group>=...``
    (Hydra refuses to override a group that is not in the defaults list)."""
    groups = _train_groups()
    out = []
    for o in overrides:
        key = o.split("=", 1)[0]
        if (
            "=" in o
            and key.isidentifier()
            and key not in groups
            and (REPO_ROOT / "conf" / key).is_dir()
        ):
            o = f"+{o}"
        out.append(o)
    return out


def max_time(minutes: float) -> str:
    """Lightning's ``max_time`` string ``DD:HH:MM:SS`` for a budget in minutes (whole seconds)."""
    s = max(1, round(minutes * 60))
    return f"{s // 86400:02d}:{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def train_argv(
    cfg: DictConfig, row: Mapping[str, Any], run_dir: Path, init_dir: Path | None = None
) -> list[str]:
    """``train.py`` overrides: shared, speed-ups, dev, then the row's group, then the row's own,
    then its budget and start point, then extras."""
    from grace_lightning.study.v3 import chosen_lr

    overrides = [
        f"backbone={cfg.base_model}",
        *_list(cfg, "train_overrides"),
        *_list(cfg, "speedups"),
        # a sweep run scores itself on its own dev data (study v3's sweeps.<name>.dev_overrides)
        *(row["dev_overrides"] if "dev_overrides" in row else _list(cfg, "dev_overrides")),
        *_list(cfg, f"{row['group']}_overrides"),
    ]
    minutes = row_minutes(cfg, row)
    if row.get("lr_from") is not None:  # v3: the sweep's choice (before the row's own keys)
        lr = chosen_lr(cfg, row["lr_from"])
        overrides.append(
            f"optim.lr={lr if lr is not None else '<chosen-by-sweep-' + row['lr_from'] + '>'}"
        )
    overrides += row["train"]
    if minutes is not None:  # Lightning Timer: stops training after this much wall time
        overrides.append(f"++trainer.max_time='{max_time(minutes)}'")
    if init_dir is not None:
        # experiment=two_stage_* declares init_from; a contrastive continuation (v3) adds it
        plus = "++" if row["group"] == "contrastive" else ""
        overrides.append(f"{plus}init_from={init_dir / 'export'}")
    overrides += [*_list(cfg, "train_extra"), f"hydra.run.dir={run_dir}"]
    return [sys.executable, str(REPO_ROOT / "train.py"), *_append_groups(overrides)]


def model_dir(cfg: DictConfig, name: str, row: Mapping[str, Any]) -> Path | None:
    """The training run a row's evaluation loads: its own, or its ``eval_of`` row's."""
    if row.get("train") is not None:
        return Path(cfg.out_dir) / name / "train"
    if row.get("eval_of") is not None:
        return Path(cfg.out_dir) / row["eval_of"] / "train"
    return None


def row_model(cfg: DictConfig, row: Mapping[str, Any], train_dir: Path | None) -> str:
    """What a row evaluates: its trained run, else its ``eval.model``, else ``base_model``."""
    if train_dir is not None:
        return str(train_dir)
    return str(row["eval"].get("model") or cfg.base_model)


def eval_argv(
    cfg: DictConfig, row: Mapping[str, Any], run_dir: Path, train_dir: Path | None
) -> list[str]:
    ev = row["eval"]
    overrides = [
        f"model={row_model(cfg, row, train_dir)}",
        f"mode={ev['mode']}",
        f"label={json.dumps(row['label'])}",
        *_list(cfg, "eval_overrides"),
        f"cache.path={run_dir / 'rationales.sqlite'}",  # per run: resumable, never shared stale
        *_list(cfg, "eval_extra"),
        f"hydra.run.dir={run_dir}",
    ]
    # eval.py + per-example data for the bootstrap (v1 configs: plain eval.py)
    entry = (
        ["-m", "grace_lightning.study.eval_stage"]
        if int(cfg.get("version", 1)) >= 2
        else [str(REPO_ROOT / "eval.py")]
    )
    return [sys.executable, *entry, *overrides]


def general_model(cfg: DictConfig, row: Mapping[str, Any], train_dir: Path | None) -> str:
    """What the general-capability proxy loads: the row's export, else its base model."""
    if train_dir is not None:
        return str(train_dir / "export")
    return str(row["eval"].get("model") or cfg.base_model)


def general_argv(cfg: DictConfig, row, run_dir: Path, train_dir: Path | None) -> list[str]:
    g = cfg.get("general") or {}
    return [
        sys.executable,
        "-m",
        "grace_lightning.eval.general",
        general_model(cfg, row, train_dir),
        "--out",
        str(run_dir / "general.json"),
        *[str(a) for a in (OmegaConf.to_container(g.get("args"), resolve=True) or [])],
    ]


def plan(cfg: DictConfig, rows: Mapping[str, Any] | None = None) -> list[Stage]:
    """Every stage of ``rows`` (default: the selected rows), in run order (a row's stages
    together)."""
    import functools

    from grace_lightning.study.v3 import sweep_rows

    out = Path(cfg.out_dir)
    stages: list[Stage] = []
    rows = rows if rows is not None else selected_rows(cfg)
    used = {r.get("lr_from") for r in rows.values()} - {None}
    sweeps = {n: r for n, r in sweep_rows(cfg).items() if r["sweep"] in used}
    for name, row in {**sweeps, **rows}.items():  # the sweeps first: their lr is needed later
        train_dir = None
        if row.get("train") is not None:
            train_dir = out / name / "train"
            dep = row.get("init_from")
            init_dir = out / dep / "train" if dep is not None else None
            argv = functools.partial(train_argv, cfg, row, train_dir, init_dir)
            stages.append(
                Stage(
                    name,
                    "train",
                    train_dir,
                    argv(),
                    rebuild=argv if row.get("lr_from") is not None else None,
                )
            )
        if row["eval"]["mode"] == "none":  # a sweep run: scored by its dev metric only
            continue
        train_dir = model_dir(cfg, name, row)
        eval_dir = out / name / "eval"
        stages.append(Stage(name, "eval", eval_dir, eval_argv(cfg, row, eval_dir, train_dir)))
        if row["eval"]["mode"] == "rationale" and cfg.get("samples") and cfg.samples.get("texts"):
            stages.append(Stage(name, "samples", out / name))
        if (cfg.get("general") or {}).get("enabled"):
            gdir = out / name / "general"
            stages.append(Stage(name, "general", gdir, general_argv(cfg, row, gdir, train_dir)))
    return stages


# ---------------------------------------------------------------------------- running
def _attempts(stage: Stage) -> list[dict[str, Any]]:
    path = stage.dir / ATTEMPTS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return rows


def _record_attempt(stage: Stage, seconds: float, rc: int, others: float | None = None) -> None:
    stage.dir.mkdir(parents=True, exist_ok=True)
    rec = {"seconds": round(seconds, 1), "rc": rc, "at": time.strftime("%FT%T")}
    if others is not None:
        rec["others_cpu_share"] = others
    with open(stage.dir / ATTEMPTS, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _terminate(child: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``: no stage outlives the study that started it (a
    killed training resumes from its atomic checkpoints)."""
    if child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _die_with_parent() -> None:
    """Linux: the stage gets SIGTERM when the study process dies, even by SIGKILL (or a lost
    terminal), so a rerun never races an orphan still writing the same run dir."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: SIGTERM/Ctrl-C handling below still applies
        pass


def _call(argv: list[str], env: dict[str, str], logf) -> int:
    """Run ``argv``; if the study is stopped (Ctrl-C, SIGTERM, SIGKILL), stop the stage with it."""
    child = subprocess.Popen(
        argv,
        cwd=REPO_ROOT,
        env=env,
        stdout=logf,
        stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )

    def on_sigterm(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return child.wait()
    finally:
        _terminate(child)
        signal.signal(signal.SIGTERM, previous)


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (``/proc/stat``: every state but
    idle and iowait, all cores); None where there is no /proc."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def others_cpu_share(busy0, busy1, own_cpu: float, wall: float) -> float | None:
    """The fraction of the machine's CPU (wall x cores) that processes other than the stage used
    while it ran: ~0 on a quiet machine. A wall-time budget buys less work when it is not."""
    if busy0 is None or busy1 is None or wall <= 0:
        return None
    return round(max(0.0, (busy1 - busy0 - own_cpu) / (wall * (os.cpu_count() or 1))), 3)


# a budgeted training stage beside other work: its budget bought less (the report shows it)
CONTENDED = 0.05


def run_subprocess(stage: Stage) -> None:
    stage.dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PROJECT_ROOT": str(REPO_ROOT)}
    busy0, own0 = busy_cpu_seconds(), children_cpu_seconds()
    t0 = time.time()
    with open(stage.log_file, "a") as logf:
        logf.write(f"\n=== {time.strftime('%FT%T')} {' '.join(stage.argv)}\n")
        logf.flush()
        try:
            rc = _call(stage.argv, env, logf)
        except (
            BaseException
        ):  # stopped (SIGTERM, Ctrl-C): the attempt counts, DONE.json is not written
            _record_attempt(stage, time.time() - t0, -1)
            raise
    seconds = time.time() - t0
    others = others_cpu_share(busy0, busy_cpu_seconds(), children_cpu_seconds() - own0, seconds)
    _record_attempt(stage, seconds, rc, others)
    if stage.kind == "train" and others is not None and others > CONTENDED:
        log.warning(
            "%s/train: other processes used %.0f%% of the CPU during its wall-time budget (it "
            "bought less work than on a quiet machine); to redo it, delete %s",
            stage.row,
            100 * others,
            stage.dir,
        )
    if rc != 0:
        raise StageFailed(
            f"study stage {stage.row}/{stage.kind} failed (exit {rc}); log: {stage.log_file}\n"
            f"{_tail(stage.log_file)}\nFix the cause and rerun the same command: finished stages are kept."
        )
    attempts = _attempts(stage)
    done = {
        "row": stage.row,
        "stage": stage.kind,
        "command": stage.argv[1:],
        "seconds": round(seconds, 1),
        "seconds_all_attempts": round(sum(a["seconds"] for a in attempts), 1),
        "attempts": len(attempts),
        "finished_at": time.strftime("%FT%T"),
        "cpu": cpu_name(),
        "others_cpu_share": others,  # CPU used by other processes (0 = a quiet machine)
    }
    atomic_write(stage.done_file, lambda f: f.write(json.dumps(done, indent=2) + "\n"), mode="w")


def cpu_name() -> str:
    """``"AMD EPYC, 2 cores, avx512_bf16"``: the machine a stage ran on (wall-time budgets buy
    different work on different CPUs; the report groups seeds by it)."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        import platform

        model = platform.processor() or model
    bf16 = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return ", ".join([model, f"{os.cpu_count()} cores", *bf16[:1]])


def write_samples(cfg: DictConfig, stage: Stage, rows: Mapping[str, Any]) -> None:
    """Rationales of the row's model for ``samples.texts`` (same sampling as its evaluation)."""
    from grace_lightning.eval.encoder import GenerationSettings
    from grace_lightning.eval.run import load_encoder

    row = rows[stage.row]
    model = row_model(cfg, row, model_dir(cfg, stage.row, row))
    t0 = time.time()
    gen = GenerationSettings(
        max_new_tokens=int(cfg.max_new_tokens), seed=int(cfg.samples.get("seed", 0))
    )
    encoder = load_encoder(model, mode="rationale", generation=gen)
    texts = [str(t) for t in cfg.samples.texts]
    rationales = encoder.rationales(texts, batch_size=len(texts), show_progress_bar=False)
    out = {
        "row": stage.row,
        "label": row["label"],
        "model": model,
        "generation": {
            "max_new_tokens": gen.max_new_tokens,
            "temperature": gen.temperature,
            "seed": gen.seed,
        },
        "samples": [{"text": t, "rationale": r} for t, r in zip(texts, rationales)],
        "seconds": round(time.time() - t0, 1),
    }
    atomic_write(
        stage.done_file,
        lambda f: f.write(json.dumps(out, indent=2, ensure_ascii=False) + "\n"),
        mode="w",
    )


def run_stages(cfg: DictConfig, rows: Mapping[str, Any]) -> list[Stage]:
    """Run every unfinished stage of ``rows`` in order; returns the plan. Stops at the first
    failure."""
    stages = plan(cfg, rows)
    if not cfg.get("dry_run"):
        restored = restore_records(cfg, stages)
        if restored:
            log.info("%d finished stage(s) restored from %s", restored, _record_dir(cfg))
        redo_lost_lineages(cfg, stages, rows)
    for i, stage in enumerate(stages, 1):
        tag = f"[{i}/{len(stages)}] {stage.row}/{stage.kind}"
        if not cfg.get("dry_run"):
            redo_changed_choice(cfg, stage, stages, rows)
        if stage.done:
            log.info("%s: done (%s), skipped", tag, stage.done_file)
            record_stage(cfg, stage)
            drop_checkpoints(cfg, stage)
            continue
        if cfg.get("dry_run"):
            print(
                f"{tag}: {' '.join(stage.argv) if stage.argv else 'rationales for samples.texts'}"
            )
            continue
        if stage.rebuild is not None:  # v3: the lr its sweep chose, now that the sweep ran
            for s in cfg.get("sweeps") or {}:
                from grace_lightning.study.v3 import chosen_lr

                if chosen_lr(cfg, s, write=True) is None and any(
                    a.endswith(f"<chosen-by-sweep-{s}>") for a in stage.rebuild()
                ):
                    raise StageFailed(
                        f"{tag}: sweep {s!r} has no finished run with a dev score; see "
                        f"{Path(cfg.out_dir) / 'sweeps' / s}/*/train/stage.log"
                    )
            stage.argv = stage.rebuild()
        log.info("%s: running -> %s", tag, stage.log_file if stage.argv else stage.done_file)
        t0 = time.time()
        if stage.kind == "samples":
            write_samples(cfg, stage, rows)
        else:
            run_subprocess(stage)
        log.info("%s: finished in %.0f s", tag, time.time() - t0)
        record_stage(cfg, stage)
        drop_checkpoints(cfg, stage)
    return stages


# ---------------------------------------------------------------------------- records
# A finished stage's small outputs (what the report and the sweep choice read), copied to
# ``record_dir`` (tracked in git): a study that spans sessions or machines resumes from a fresh
# clone, where ``out_dir`` (weights, checkpoints, caches) is gone.
RECORD_GLOBS = (
    DONE,
    ATTEMPTS,
    "scores.json",
    "per_example.json",
    "results.md",
    "samples.json",
    "general.json",
    ".hydra/config.yaml",
    ".hydra/overrides.yaml",
    "csv/version_*/metrics.csv",
)


def _record_dir(cfg: DictConfig) -> Path | None:
    rec = cfg.get("record_dir")
    return Path(rec) if rec else None


def _stage_files(stage: Stage) -> list[Path]:
    if stage.kind == "samples":
        return [stage.done_file] if stage.done else []
    return sorted({p for g in RECORD_GLOBS for p in stage.dir.glob(g) if p.is_file()})


def record_stage(cfg: DictConfig, stage: Stage) -> None:
    """Copy a finished stage's small outputs to ``record_dir`` (same relative paths)."""
    rec, out = _record_dir(cfg), Path(cfg.out_dir)
    if rec is None or not stage.done:
        return
    for src in _stage_files(stage):
        dst = rec / src.relative_to(out)
        if not dst.is_file() or dst.stat().st_mtime < src.stat().st_mtime:
            dst.parent.mkdir(parents=True, exist_ok=True)
            _copy(src, dst, str(REPO_ROOT), ROOT_MARK)


ROOT_MARK = "<repo>"  # the repo root in records: no machine's absolute path goes into git


def _copy(src: Path, dst: Path, old: str, new: str) -> None:
    """Copy a record, with ``old`` -> ``new`` in its text (paths under the repo root). Line
    endings are kept as they are (Lightning's metrics.csv ends its lines with CRLF), and a record
    whose text would not change is not rewritten (a restore-then-record round trip leaves git
    clean)."""
    try:
        with open(src, newline="") as f:
            text = f.read().replace(old, new)
    except UnicodeDecodeError:
        shutil.copy2(src, dst)
        return
    if dst.is_file() and dst.read_bytes() == text.encode():
        return
    with open(dst, "w", newline="") as f:
        f.write(text)


def restore_records(cfg: DictConfig, stages: list[Stage]) -> int:
    """Stages finished in ``record_dir`` and absent from ``out_dir`` (a fresh clone or
    machine): copy their records back so that they count as done. A stage whose directory is
    here without its DONE.json (stopped midway, or DONE.json deleted to redo it) runs again.
    Returns how many were restored."""
    rec, out = _record_dir(cfg), Path(cfg.out_dir)
    if rec is None or not rec.is_dir():
        return 0
    # what was here before anything is restored (a samples stage's file lives in its row dir)
    absent = {
        id(st): not (st.done_file.parent if st.kind == "samples" else st.dir).exists()
        for st in stages
    }
    n = 0
    for stage in stages:
        rel = stage.done_file.relative_to(out)
        if stage.done or not absent[id(stage)] or not (rec / rel).is_file():
            continue
        src_dir = rec / (rel if stage.kind == "samples" else stage.dir.relative_to(out))
        files = (
            [src_dir] if stage.kind == "samples" else [p for p in src_dir.rglob("*") if p.is_file()]
        )
        for f in files:
            dst = out / f.relative_to(rec)
            dst.parent.mkdir(parents=True, exist_ok=True)
            _copy(f, dst, ROOT_MARK, str(REPO_ROOT))
        n += 1
    return n


def has_weights(train_dir: Path) -> bool:
    export = train_dir / "export"
    return any(export.glob("*.safetensors")) or any(export.glob("*.bin"))


def redo_lost_lineages(cfg: DictConfig, stages: list[Stage], rows: Mapping[str, Any]) -> list[str]:
    """A finished training whose weights are gone (restored from records) while a stage that
    loads them (its own evaluation, a row that starts from it or evaluates it) is unfinished:
    the training and every finished stage of its lineage run again, so that each paired result
    comes from one model. The old stage dirs are kept as ``<dir>.superseded-<time>`` and their
    records removed (git keeps them). Returns the rows redone."""
    rec = _record_dir(cfg)
    by_row: dict[str, list[Stage]] = {}
    for st in stages:
        by_row.setdefault(st.row, []).append(st)
    redone: list[str] = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for st in stages:
        if st.kind != "train" or not st.done or has_weights(st.dir) or st.row in redone:
            continue
        lineage = _lineage(st.row, rows)
        needs = [x for r in lineage for x in by_row.get(r, []) if x is not st and not x.done]
        if not needs:
            continue
        log.warning(
            "%s: finished, but its weights are gone (restored from %s) and %s still need them: "
            "redoing %s",
            st.row,
            rec,
            ", ".join(f"{x.row}/{x.kind}" for x in needs),
            ", ".join(lineage),
        )
        _supersede(cfg, [x for r in lineage for x in by_row.get(r, [])], stamp)
        redone += lineage
    return redone


def _lineage(row: str, rows: Mapping[str, Any]) -> list[str]:
    """``row`` and every row that starts from it or evaluates it, transitively."""
    children: dict[str, set[str]] = {}
    for name, r in rows.items():
        for key in ("init_from", "eval_of"):
            if r.get(key) is not None:
                children.setdefault(r[key], set()).add(name)
    lineage, todo = [row], [row]
    while todo:
        for c in sorted(children.get(todo.pop(), ())):
            if c not in lineage:
                lineage.append(c)
                todo.append(c)
    return lineage


def _supersede(cfg: DictConfig, stages: list[Stage], stamp: str) -> None:
    """Move the finished ``stages``' dirs aside as ``<dir>.superseded-<stamp>`` (they run
    again) and remove their records (git keeps them)."""
    out, rec = Path(cfg.out_dir), _record_dir(cfg)
    for x in stages:
        if not x.done:
            continue
        target = x.done_file if x.kind == "samples" else x.dir
        target.rename(target.with_name(f"{target.name}.superseded-{stamp}"))
        if rec is not None:
            old = rec / target.relative_to(out)
            if old.is_dir():
                shutil.rmtree(old)
            elif old.is_file():
                old.unlink()


def _recorded_lr(train_dir: Path) -> str | None:
    """The ``optim.lr=`` override a finished training ran with (its .hydra/overrides.yaml)."""
    path = train_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    # unresolved: an override like ``backbone.pretrained=${init_from}`` is text here, not a
    # reference into this list
    overrides = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    lrs = [o for o in overrides if str(o).startswith("optim.lr=")]
    return str(lrs[-1]) if lrs else None


def redo_changed_choice(
    cfg: DictConfig, stage: Stage, stages: list[Stage], rows: Mapping[str, Any]
) -> bool:
    """A finished training whose lr came from a sweep (``lr_from``) that now chooses another lr
    (its grid was extended, a sweep run redone): the training and its lineage run again with
    the new choice. Returns whether it did."""
    if stage.kind != "train" or stage.rebuild is None or not stage.done:
        return False
    want = [a for a in stage.rebuild() if a.startswith("optim.lr=")]
    if not want or "<chosen-by-sweep-" in want[-1]:
        return False  # the sweep has not chosen yet
    had = _recorded_lr(stage.dir)
    if had is None or float(had.split("=", 1)[1]) == float(want[-1].split("=", 1)[1]):
        return False
    lineage = _lineage(stage.row, rows)
    log.warning(
        "%s: trained with %s, but its sweep now chooses %s: redoing %s",
        stage.row,
        had,
        want[-1],
        ", ".join(lineage),
    )
    _supersede(cfg, [x for x in stages if x.row in lineage], time.strftime("%Y%m%d-%H%M%S"))
    return True


def drop_checkpoints(cfg: DictConfig, stage: Stage) -> None:
    """``keep_checkpoints: false``: a finished train stage never resumes, and its export/ is
    what the later stages load, so its checkpoints/ (~3 GB a SmolLM2 row: weights + AdamW,
    last + best) go. A full disk killed a v2 run mid-study before this."""
    if cfg.get("keep_checkpoints", True) or stage.kind != "train" or not stage.done:
        return
    ckpts = stage.dir / "checkpoints"
    if ckpts.is_dir():
        shutil.rmtree(ckpts)
        log.info(
            "%s/%s: finished; removed %s (keep_checkpoints=false)", stage.row, stage.kind, ckpts
        )


def budget_lines(cfg: DictConfig, rows: Mapping[str, Any]) -> list[str]:
    """The study's budget: each row's training budget and evaluation estimate (minutes), and
    what its finished stages actually took (DONE.json), with totals."""
    est = dict(cfg.get("eval_minutes_estimate") or {})
    out = Path(cfg.out_dir)
    w = max([20, *(len(n) for n in rows)])  # the widest row name (v3: <arm>/seed<s>)
    lines = [f"{'row':<{w}} {'train budget':>12} {'eval est.':>9} {'spent':>7}  starts from"]
    tot_plan = tot_spent = 0.0
    for name, row in rows.items():
        train = row_minutes(cfg, row) if row.get("train") is not None else 0.0
        ev = float(est.get(row["eval"]["mode"], 0) or 0)
        spent = 0.0
        for sub in ("train", "eval", "general"):
            done = out / name / sub / DONE
            if done.is_file():
                spent += json.loads(done.read_text()).get("seconds_all_attempts", 0) / 60
        tot_plan += (train or 0) + ev
        tot_spent += spent
        # a trained row without a wall-time budget trains to its max_steps cap: "steps"
        budget = (
            "steps" if row.get("train") is not None and train is None else f"{train or 0:.1f} m"
        )
        lines.append(
            f"{name:<{w}} {budget:>12} {ev:>7.1f} m {spent:>5.1f} m  {row.get('init_from') or '-'}"
        )
    lines.append(f"{'total':<{w}} {tot_plan:>21.1f} m {tot_spent:>5.1f} m")
    return lines


def run_study(cfg: DictConfig) -> str:
    """Run (or resume) the study, then write the report; returns the report's markdown block."""
    from grace_lightning.study.report import build_report, update_readme

    rows = selected_rows(cfg)  # all rows unless `only` names some (+ the rows they start from)
    print("Study budget (minutes; eval from eval_minutes_estimate):")
    print("\n".join(budget_lines(cfg, rows)), flush=True)
    if cfg.get("seeds"):  # v3: arms x seeds, sweeps and the estimated total
        from grace_lightning.study.v3 import arms_lines

        print("\n".join(arms_lines(cfg, rows)), flush=True)
    if not cfg.get("report_only"):
        run_stages(cfg, rows)
        if cfg.get("dry_run"):
            return ""
    block = build_report(cfg, rows, Path(cfg.report_dir))
    if cfg.get("update_readme"):
        readme = REPO_ROOT / "README.md"
        if update_readme(readme, block):
            log.info("README.md: study section updated")
        else:
            log.warning("README.md has no study markers; the report is in %s", cfg.report_dir)
    print(block)
    return block
