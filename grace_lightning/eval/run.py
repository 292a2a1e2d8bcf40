"""`python eval.py`: one model, one suite, MTEB results + the paper's table (``conf/eval.yaml``).

1. resolve ``model=`` (backbone name | run/export dir | Hub id) into a :class:`GraceEncoder`;
2. build the suite's tasks (``conf/eval/<suite>.yaml``; mteb's or local files);
3. ``mteb.evaluate`` each task, results in ``<run dir>/mteb`` (a local ``ResultCache``: nothing
   is written to ``~/.cache/mteb``; a rerun in the same dir skips finished tasks), CO2 off;
4. write and print the paper-style table (``report.py``), log it to W&B if enabled.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from grace_lightning.eval.encoder import GenerationSettings, GraceEncoder, hub_offline
from grace_lightning.eval.report import markdown_table, summarize, task_main_score, write_results
from grace_lightning.eval.rundir import RunDirError
from grace_lightning.eval.suites import build_tasks, task_category

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILTIN_BACKBONES = ("smollm2", "tiny")


class HubDataError(RuntimeError):
    """An MTEB task's dataset could not be fetched from the Hugging Face Hub."""


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1


def backbone_config(name: str, conf_dir: Path | None = None) -> dict[str, Any] | None:
    """``conf/backbone/<name>.yaml`` as a dict, or None if there is no such backbone."""
    path = (conf_dir or REPO_ROOT / "conf") / "backbone" / f"{name}.yaml"
    if path.is_file():
        return dict(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
    if name == "smollm2":
        return {"name": "smollm2", "source": "gguf"}
    if name == "tiny":
        return {"name": "tiny", "source": "tiny"}
    return None


def checkpoint_export(ckpt: Path) -> Path:
    """The export of a ``.ckpt`` for evaluation: made once under ``$GRACE_CACHE/exports/``
    (keyed by the checkpoint's path, size and mtime), reused while the checkpoint is unchanged."""
    import hashlib
    import shutil

    from grace_lightning.eval.rundir import check_export_dir
    from grace_lightning.export import export_checkpoint
    from grace_lightning.models.backbone import cache_root

    ckpt = ckpt.resolve()
    st = ckpt.stat()
    key = hashlib.sha256(f"{ckpt}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    target = cache_root() / "exports" / f"{run.name}-{ckpt.stem}-{key}"
    if target.is_dir():
        try:
            check_export_dir(target)
            log.info("model=%s: using its export %s", ckpt, target)
            return target
        except RunDirError:
            shutil.rmtree(target, ignore_errors=True)  # half-written by a killed run: redo
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("model=%s: exporting to %s", ckpt, target)
    export_checkpoint(ckpt, tmp, run_dir=run)
    tmp.rename(target)
    return target


def load_encoder(spec: str, **kwargs: Any) -> GraceEncoder:
    """``spec``: a backbone name (``conf/backbone``), a run/export dir, a ``.ckpt``, a Hub id."""
    spec = str(spec)
    if (cfg := backbone_config(spec)) is not None:
        return GraceEncoder.from_backbone(cfg, **kwargs)
    path = Path(spec).expanduser()
    if path.suffix == ".ckpt":
        if not path.is_file():
            raise RunDirError(f"model={spec}: no such checkpoint file")
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        kwargs.setdefault("name", f"{run.name}-{path.stem}")
        return GraceEncoder.from_run_dir(checkpoint_export(path), **kwargs)
    if path.exists():
        return GraceEncoder.from_run_dir(path, **kwargs)
    if _looks_like_path(spec):
        raise RunDirError(f"model={spec}: no such run or export directory")
    return GraceEncoder.from_pretrained(spec, **kwargs)


def _hub_error(task, err: Exception) -> HubDataError:
    path = task.metadata.dataset.get("path", "?")
    offline = " (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set)" if hub_offline() else ""
    return HubDataError(
        f"task {task.metadata.name} reads its data from the Hugging Face Hub ({path}), which "
        f"cannot be reached{offline}: {err}. Offline, evaluate the local suite instead: "
        f"`python eval.py eval=local` (MTEB tasks built from files under ../shared/data)."
    )


def _is_local(task) -> bool:
    from grace_lightning.eval.local_tasks import _LocalTask

    return isinstance(task, _LocalTask)


def preflight(tasks) -> None:
    """Offline (HF_*_OFFLINE set) with Hub tasks: load the first one's data now, so a missing
    dataset fails before the model is loaded, not after the first task's generation."""
    hub = [t for t in tasks if not _is_local(t)]
    if not hub or not (hub_offline() or os.environ.get("HF_DATASETS_OFFLINE") == "1"):
        return
    try:
        hub[0].load_data()
    except (ConnectionError, OSError) as e:
        raise _hub_error(hub[0], e) from e
    hub[0].unload_data()


def evaluate_tasks(model, tasks, out_dir: Path, batch_size: int, overwrite: str) -> list[dict]:
    """``mteb.evaluate`` task by task; -> rows ``{task, category, main_score, score (x100)}``."""
    import mteb
    from datasets.exceptions import DatasetNotFoundError

    cache = mteb.ResultCache(cache_path=out_dir / "mteb")
    rows = []
    for i, task in enumerate(tasks, 1):
        name = task.metadata.name
        log.info("[%d/%d] %s (%s)", i, len(tasks), name, task.metadata.type)
        t0 = time.time()
        try:
            result = mteb.evaluate(
                model,
                task,
                co2_tracker=False,
                cache=cache,
                overwrite_strategy=overwrite,
                encode_kwargs={"batch_size": batch_size},
                show_progress_bar=False,
                public_only=False,  # surface dataset errors instead of skipping the task
            )
        except (ConnectionError, DatasetNotFoundError) as e:
            if _is_local(task):
                raise
            raise _hub_error(task, e) from e
        if result.exceptions:
            raise RuntimeError(f"task {name} failed: {result.exceptions[0].exception}")
        score = 100 * task_main_score(result.task_results[0], task)
        rows.append(
            {
                "task": name,
                "category": task_category(task),
                "main_score": task.metadata.main_score,
                # the dataset split scored: a local task's source (dev, trial, ...), else mteb's
                "split": getattr(task, "source_split", None) or ",".join(task.metadata.eval_splits),
                "score": score,
                "seconds": round(time.time() - t0, 2),
            }
        )
        log.info("%s: %s = %.2f", name, task.metadata.main_score, score)
    return rows


def tasks_from_cfg(cfg: DictConfig) -> list:
    """The MTEB tasks of ``cfg.eval`` (the suite), restricted to ``cfg.tasks`` when given."""
    suite = OmegaConf.to_container(cfg.eval, resolve=True)
    return build_tasks(
        suite,
        only=list(cfg.tasks) if cfg.get("tasks") else None,
        data_root=suite.get("data_root"),
        max_samples=suite.get("max_samples"),
        seed=int(cfg.get("task_seed", 42)),
    )


def build_encoder(cfg: DictConfig):
    """The encoder ``cfg`` asks for: one ``GraceEncoder``, or with ``num_processes > 1`` a
    ``DistributedEncoder`` (one process per device, texts sharded, rationale caches merged; the
    same vectors as one process: per-text seeded sampling)."""
    kwargs = dict(
        mode=cfg.mode,
        dtype=cfg.get("dtype"),
        generation=GenerationSettings(**OmegaConf.to_container(cfg.generation, resolve=True)),
        **_prompt_kwargs(cfg.get("prompt") or {}),
    )
    cache = Path(cfg.cache.path) if cfg.cache.enabled and cfg.mode == "rationale" else None
    processes = int(cfg.get("num_processes") or 1)
    precision = cfg.get("precision") or "fp32"
    if processes > 1:
        import functools

        from grace_lightning.eval.distributed import DistributedEncoder

        factory = functools.partial(load_encoder, str(cfg.model), **kwargs)
        return DistributedEncoder(factory, processes, cache=cache, precision=precision)
    encoder = load_encoder(cfg.model, device=cfg.get("device"), cache=cache, **kwargs)
    if precision == "bf16":
        from grace_lightning.eval.distributed import with_autocast

        encoder.encode = with_autocast(encoder, precision)  # fp32 weights, bf16 matmuls
    return encoder


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run ``cfg`` (``conf/eval.yaml``); returns the run summary written to ``scores.json``."""
    out_dir = Path(cfg.paths.output_dir)
    os.environ.setdefault("MTEB_CACHE", str(out_dir / "mteb"))  # mteb's default cache: not ~/.cache
    tasks = tasks_from_cfg(cfg)
    preflight(tasks)

    encoder = build_encoder(cfg)
    from grace_lightning.eval.mteb_model import GraceMTEBModel

    label = cfg.get("label") or f"{encoder.name} ({cfg.mode})"
    model = GraceMTEBModel(encoder, show_progress_bar=bool(cfg.get("progress_bar", True)))
    t0 = time.time()
    rows = evaluate_tasks(model, tasks, out_dir, int(cfg.batch_size), str(cfg.overwrite))
    run = {
        "label": label,
        "model": str(cfg.model),
        "mode": cfg.mode,
        "suite": cfg.eval.get("name"),
        "fingerprint": encoder.fingerprint,
        "generation": OmegaConf.to_container(cfg.generation, resolve=True),
        "system_prompt": encoder.system_prompt,
        "prompts": encoder.prompts or None,  # per-task / query / document system prompts
        "tasks": rows,
        **summarize(rows),
        "encoder_stats": dict(encoder.stats),
        "rationale_cache": encoder.cache.stats() if encoder.cache is not None else None,
        "seconds": round(time.time() - t0, 2),
    }
    paths = write_results(out_dir, run)
    table = markdown_table([run])
    print(f"\n{table}\n\nResults: {paths['md']} | {paths['csv']} | MTEB files: {out_dir / 'mteb'}")
    if run["rationale_cache"]:
        log.info("rationale cache %s: %s", cfg.cache.path, run["rationale_cache"])
    if cfg.get("wandb") and cfg.wandb.get("enabled"):
        log_wandb(run, cfg.wandb, out_dir)
    return run


def _prompt_kwargs(prompt: Mapping[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if prompt.get("system_prompt") is not None:
        kwargs["system_prompt"] = prompt["system_prompt"]
    if prompt.get("max_prompt_tokens") is not None:
        kwargs["max_prompt_tokens"] = int(prompt["max_prompt_tokens"])
    prompts = {k: prompt.get(k) for k in ("query", "document") if prompt.get(k)}
    prompts.update({k: v for k, v in dict(prompt.get("by_task") or {}).items() if v})
    if prompts:
        kwargs["prompts"] = prompts
    return kwargs


def log_wandb(run: dict[str, Any], wcfg: Mapping[str, Any], out_dir: Path) -> None:
    """The paper table and the per-task scores as W&B tables (offline unless mode=online)."""
    import wandb

    from grace_lightning.eval.report import COLUMNS

    wb = wandb.init(
        project=wcfg.get("project", "grace"),
        entity=wcfg.get("entity"),
        name=wcfg.get("name") or run["label"],
        mode=wcfg.get("mode", "offline"),
        dir=str(out_dir),
        job_type="eval",
        config={k: run[k] for k in ("model", "mode", "suite", "fingerprint", "generation")},
        reinit=True,
    )
    cats = run["categories"]
    table = wandb.Table(
        columns=["model", *COLUMNS, "Avg", "n_tasks"],
        data=[[run["label"], *[cats.get(c) for c in COLUMNS], run["avg"], run["n_tasks"]]],
    )
    tasks = wandb.Table(
        columns=["task", "category", "main_score", "score"],
        data=[[t["task"], t["category"], t["main_score"], t["score"]] for t in run["tasks"]],
    )
    wb.log({"eval/table": table, "eval/tasks": tasks, "eval/avg": run["avg"]})
    wb.summary["avg_definition"] = "unweighted mean over tasks"
    wb.finish()
