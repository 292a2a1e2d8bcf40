"""The training run behind ``train.py``: compose -> validate -> data -> model -> fit -> export."""

from __future__ import annotations

import json
import logging
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from grace_lightning import quiet_known_noise
from grace_lightning.config import validate
from grace_lightning.models.backbone import BackboneConfig, load_tokenizer
from grace_lightning.presets import check_hardware
from grace_lightning.prompts import ChatPrompter
from grace_lightning.utils.resume import persist_wandb_id, resolve_ckpt_path
from grace_lightning.utils.slurm import hand_requeue_signal_to_lightning
from grace_lightning.utils.wandb import finish_wandb_run, hydra_choices

log = logging.getLogger(__name__)


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict-of-configs group (callbacks, loggers)."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if c and "_target_" in c]


def drop_lr_monitor_without_logger(callbacks: list[Any], loggers: list[Any]) -> list[Any]:
    """Lightning refuses ``LearningRateMonitor`` without a logger (``logger=none``): drop it."""
    if loggers:
        return callbacks
    from lightning.pytorch.callbacks import LearningRateMonitor

    kept = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if len(kept) != len(callbacks):
        log.info("logger=none: no learning-rate monitor (it needs a logger)")
    return kept


def length_cache_key(cfg: DictConfig, tokenizer) -> str:
    """What the prompt token counts depend on (the data store caches them under it)."""
    return json.dumps(
        {
            "counter": "ChatPrompter.lengths/v1",
            "tokenizer": str(tokenizer.name_or_path),
            "revision": cfg.backbone.get("revision"),
            "vocab": len(tokenizer),
            "chat_template": tokenizer.chat_template,
            "system_prompt": cfg.prompt.system_prompt,
        },
        sort_keys=True,
    )


def with_time_budget_bar(callbacks: list[Any], enabled: bool) -> list[Any]:
    """Lightning's default bar -> `TimeBudgetProgressBar` (its ETA follows ``max_time``), unless
    the bar is off or a progress bar callback is already given."""
    from lightning.pytorch.callbacks import ProgressBar

    from grace_lightning.callbacks.progress import TimeBudgetProgressBar

    if not enabled or any(isinstance(c, ProgressBar) for c in callbacks):
        return callbacks
    return [*callbacks, TimeBudgetProgressBar()]


def build_trainer(cfg: DictConfig, callbacks: list[Any], loggers: list[Any]) -> L.Trainer:
    """``cfg.trainer`` -> ``L.Trainer``; plugins whose factory returned None (e.g. the SLURM
    environment off SLURM) are dropped, as is the LR monitor when there is no logger."""
    tcfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    plugins = [hydra.utils.instantiate(p) for p in tcfg.pop("plugins", None) or []]
    plugins = [p for p in plugins if p is not None]
    callbacks = with_time_budget_bar(callbacks, tcfg.get("enable_progress_bar", True))
    return hydra.utils.instantiate(
        tcfg,
        callbacks=drop_lr_monitor_without_logger(callbacks, loggers),
        logger=loggers or False,
        plugins=plugins or None,
    )


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """One training job. The W&B run it opened is finished when it returns or raises (failed:
    exit code 1), so each Hydra multirun job and each sweep-agent run is its own W&B run."""
    try:
        result = _train(cfg)
    except BaseException:
        finish_wandb_run(exit_code=1)
        raise
    finish_wandb_run()
    return result


def _train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    quiet_known_noise()  # third-party messages that are no concern of the user's (first screen)
    validate(cfg)
    check_hardware(cfg)  # no GPU for a GPU recipe / a recipe the GPU cannot hold: stop now
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    # data first: bad input fails here, before any model loads
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.load()
    tokenizer = load_tokenizer(BackboneConfig(**cfg.backbone))
    prompter = ChatPrompter(tokenizer, cfg.prompt.system_prompt, cfg.prompt.max_prompt_tokens)
    datamodule.filter_by_length(prompter.lengths, key=length_cache_key(cfg, tokenizer))

    model = hydra.utils.instantiate(cfg.model, _convert_="all")
    callbacks = instantiate_group(cfg.get("callbacks"))
    persist_wandb_id(cfg)  # a resumed run (ckpt_path=last) logs to the same W&B run
    loggers = instantiate_group(cfg.get("logger"))
    trainer = build_trainer(cfg, callbacks, loggers)
    hparams = {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "hydra"}
    hparams = OmegaConf.to_container(OmegaConf.create(hparams), resolve=True)
    for lg in loggers:  # W&B: under `cfg` and `choices`, clear of a sweep's parameters
        if hasattr(lg, "log_config"):
            lg.log_config(hparams, hydra_choices(cfg))
        else:
            lg.log_hyperparams(hparams)

    hand_requeue_signal_to_lightning(trainer)  # SLURM: USR2 -> save hpc_ckpt + requeue
    trainer.fit(
        model,
        datamodule=datamodule,
        ckpt_path=resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.output_dir),
    )
    print_dev_summary(trainer)
    metrics = {
        k: float(v)
        for k, v in trainer.callback_metrics.items()
        if torch.is_tensor(v) and v.numel() == 1
    }
    return metrics, {"cfg": cfg, "model": model, "trainer": trainer, "datamodule": datamodule}


def print_dev_summary(trainer: L.Trainer) -> None:
    """Print the dev callback's before/after table (rank 0): what a new user sees at the end."""
    from grace_lightning.callbacks.dev_eval import DevEvaluation

    if not trainer.is_global_zero:
        return
    for cb in trainer.callbacks:
        text = cb.summary() if isinstance(cb, DevEvaluation) else None
        if text:
            print(text, flush=True)


def metric_value(metrics: dict[str, float], name: str | None) -> float | None:
    if not name:
        return None
    if name not in metrics:
        raise KeyError(f"optimized_metric={name!r} was not logged; logged: {sorted(metrics)}")
    return metrics[name]
