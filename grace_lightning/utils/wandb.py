"""W&B for ``train.py``: one W&B run per training job, the whole config under ``cfg``, tags from
the resolved config.

- **Mode**: Lightning's ``WandbLogger(offline=True)`` sets ``WANDB_MODE=dryrun`` itself, so a
  config default of ``offline: true`` silently beat ``WANDB_MODE=online`` in the environment. Here
  ``offline: null`` (conf/logger/wandb.yaml) means: offline unless ``WANDB_MODE`` is ``online``
  (or ``run``/``disabled``, which W&B then handles); ``true``/``false`` force it.
- **One run per job**: a Hydra multirun runs its jobs in one process, and Lightning's
  ``WandbLogger`` reuses ``wandb.run`` when one is active, so every job after the first logged into
  the first job's run. :func:`finish_wandb_run` (called by ``grace_lightning.train.train`` when a
  job returns or raises, as lightning-hydra-template's ``task_wrapper`` does) finishes it.
- **Config namespace**: W&B sweep parameters are set on ``wandb.config`` by the agent
  (``WANDB_SWEEP_PARAM_PATH``, ``Config.update_locked(..., user="sweep")``) and locked, and the
  sweeps' parameters (``backbone``, ``reward``, ``algo``, ``reward.lambda_hard``) are also config
  group names: logging the nested ``backbone: {...}`` on top of them was dropped ("Config item
  'backbone' was locked by 'sweep'"). :class:`GraceWandbLogger` logs the resolved config under
  ``cfg`` and the Hydra group choices under ``choices``, so the top level holds only the sweep's
  parameters, as the agent passed them.
- **Tags**: ``tags`` (the experiment's) plus the reward mode, method and backbone name of the
  resolved config (``run_tags`` in conf/logger/wandb.yaml); a free tag naming another reward mode
  or method (``paper_sup``'s ``sup`` on a ``reward=unsup`` run) is dropped.
- **Sweep agent** (``WANDB_SWEEP_ID`` set): W&B ignores ``id``/``project``/``entity`` (the agent
  chose them): they are not passed, and ``persist_wandb_id`` keeps no id.

``python -m grace_lightning.utils.wandb <offline run dir> [--summary]`` prints an offline run's id,
tags and config (and last logged values), read from its ``run-<id>.wandb`` file (no W&B server).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from argparse import Namespace
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.logger import (
    _convert_json_serializable,
    _convert_params,
    _sanitize_callable_params,
)
from lightning.pytorch.loggers.wandb import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from typing_extensions import override

ONLINE_MODES = ("online", "run", "disabled")
CONFIG_KEY = "cfg"  # the resolved Hydra config: wandb.config["cfg"]
CHOICES_KEY = "choices"  # the Hydra group choices (backbone: qwen, reward: sup, ...)
SWEEP_ID_ENV = "WANDB_SWEEP_ID"  # set by `wandb agent` for the runs it starts
MODES = ("sup", "unsup")  # reward.mode
METHODS = ("grace", "infonce", "simcse")  # GraceModule | ContrastiveModule.objective


def offline_from_env(offline: bool | None) -> bool:
    if offline is not None:
        return bool(offline)
    return os.environ.get("WANDB_MODE", "offline").strip().lower() not in ONLINE_MODES


def under_sweep_agent() -> bool:
    """True in a run started by ``wandb agent`` (it sets ``WANDB_SWEEP_ID``)."""
    return bool(os.environ.get(SWEEP_ID_ENV))


def run_tags(tags: Sequence[str] | None, derived: Sequence[str] | None) -> list[str]:
    """``derived`` (reward mode, method, backbone of the resolved config) + the free ``tags``,
    without duplicates and without a free tag naming another reward mode or method."""
    derived = [str(t) for t in derived or [] if t not in (None, "")]
    wrong = {t for vocab in (MODES, METHODS) if set(vocab) & set(derived) for t in vocab}
    wrong -= set(derived)
    out: list[str] = []
    for t in [*derived, *(str(t) for t in tags or [])]:
        if t not in out and t not in wrong:
            out.append(t)
    return out


def wandb_logger(
    offline: bool | None = None,
    tags: Sequence[str] | None = None,
    run_tags_from_config: Sequence[str] | None = None,
    **kwargs: Any,
):
    """``GraceWandbLogger`` from conf/logger/wandb.yaml (Hydra ``_target_``)."""
    if under_sweep_agent():  # the agent's run id, project and entity; W&B would warn and ignore
        for key in ("id", "project", "entity"):
            kwargs.pop(key, None)
    return GraceWandbLogger(
        offline=offline_from_env(offline),
        tags=run_tags(tags, run_tags_from_config),
        **kwargs,
    )


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


class GraceWandbLogger(WandbLogger):
    """``WandbLogger`` that never writes hyperparameters at the top level of ``wandb.config``
    (where a sweep agent's parameters live, locked).

    - :meth:`log_config`: the run's resolved config -> ``wandb.config["cfg"]``, and the Hydra
      group choices -> ``wandb.config["choices"]``.
    - :meth:`log_hyperparams`: what Lightning logs at fit start, the LightningModule's init
      arguments (``cfg.model`` resolved): merged into ``wandb.config["cfg"]["model"]``.
    """

    @rank_zero_only
    def log_config(
        self, config: Mapping[str, Any], choices: Mapping[str, Any] | None = None
    ) -> None:
        update: dict[str, Any] = {CONFIG_KEY: dict(config)}
        if choices:
            update[CHOICES_KEY] = dict(choices)
        self.experiment.config.update(update, allow_val_change=True)

    @override
    @rank_zero_only
    def log_hyperparams(self, params: Mapping[str, Any] | Namespace) -> None:
        params = _convert_json_serializable(_sanitize_callable_params(_convert_params(params)))
        current = dict(self.experiment.config.get(CONFIG_KEY) or {})
        current["model"] = deep_merge(current.get("model") or {}, params)
        self.experiment.config.update({CONFIG_KEY: current}, allow_val_change=True)


def hydra_choices(cfg: Any) -> dict[str, Any] | None:
    """The Hydra group choices of the job (``backbone: qwen``, ``experiment: paper_sup``, ...):
    ``cfg.hydra`` when composed with it (tests), else the running job's ``HydraConfig``."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    choices = OmegaConf.select(cfg, "hydra.runtime.choices", default=None)
    if choices is None and HydraConfig.initialized():
        choices = HydraConfig.get().runtime.choices
    if choices is None:
        return None
    plain = OmegaConf.to_container(choices) if OmegaConf.is_config(choices) else dict(choices)
    return {k: v for k, v in plain.items() if not k.startswith("hydra/")}


def finish_wandb_run(exit_code: int = 0) -> bool:
    """``wandb.finish()`` if wandb is imported and a run is active (lightning-hydra-template's
    ``task_wrapper``): the next job of a Hydra multirun then starts its own run. A non-zero
    ``exit_code`` marks the run failed. Returns whether a run was finished."""
    wandb = sys.modules.get("wandb")
    if wandb is None or getattr(wandb, "run", None) is None:
        return False
    wandb.finish(exit_code=exit_code)
    return True


# ---------------------------------------------------------------------------- offline run files
# A run's ``run-<id>.wandb`` is a LevelDB-style log (what ``wandb sync`` uploads): a 7-byte header
# (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of records, each a 7-byte header (crc32c,
# length, type: 1 full, 2 first, 3 middle, 4 last) and a chunk of a serialized ``Record`` proto.
_BLOCK, _HEADER = 32768, 7


def read_records(path: str | Path) -> list[Any]:
    """The ``wandb_internal_pb2.Record`` messages of an offline run's ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    pos, parts, records = _HEADER, b"", []
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0:  # zero fill at the end of a block
            continue
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            records.append(record)
    return records


def _item_key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def read_offline_run(run_dir: str | Path) -> dict[str, Any]:
    """An offline run dir (``wandb/offline-run-<time>-<id>``) -> ``{"id", "sweep_id", "tags",
    "config", "history" (one dict per logged step), "summary", "exit_code"}``."""
    run_dir = Path(run_dir)
    (path,) = run_dir.glob("run-*.wandb")
    out: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "exit_code": None}
    for r in read_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(id=r.run.run_id, sweep_id=r.run.sweep_id or None, tags=list(r.run.tags))
            updates = r.run.config.update
        elif kind == "config":
            updates = r.config.update
        else:
            updates = []
            if kind == "history":
                row = {_item_key(i): json.loads(i.value_json) for i in r.history.item}
                out["history"].append(row)
            elif kind == "summary":
                out["summary"].update(
                    {_item_key(i): json.loads(i.value_json) for i in r.summary.update}
                )
            elif kind == "exit":
                out["exit_code"] = r.exit.exit_code
        for u in updates:
            out["config"][_item_key(u)] = json.loads(u.value_json)
    out["config"].pop("_wandb", None)
    return out


def main(argv: list[str] | None = None) -> int:
    import yaml

    p = argparse.ArgumentParser(description="Print an offline W&B run's id, tags and config.")
    p.add_argument("run_dir", help="<run dir>/wandb/offline-run-<time>-<id>")
    p.add_argument("--summary", action="store_true", help="also the last logged values")
    args = p.parse_args(argv)
    run = read_offline_run(args.run_dir)
    shown = {k: run[k] for k in ("id", "sweep_id", "tags", "exit_code")}
    shown["logged steps"] = len(run["history"])
    shown["config"] = run["config"]
    if args.summary:
        shown["summary"] = {k: v for k, v in run["summary"].items() if not k.startswith("_")}
    print(yaml.safe_dump(shown, sort_keys=False, width=100), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
