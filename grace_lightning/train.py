"""The training run behind ``train.py``: compose -> validate -> data -> model -> fit -> export."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from grace_lightning.config import validate
from grace_lightning.models.backbone import BackboneConfig, load_tokenizer
from grace_lightning.prompts import ChatPrompter
from grace_lightning.utils.resume import persist_wandb_id

log = logging.getLogger(__name__)


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict-of-configs group (callbacks, loggers)."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if c and "_target_" in c]


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str) -> str | None:
    """``last`` means this run dir's ``checkpoints/last.ckpt`` if it exists (fresh start if not)."""
    if ckpt_path != "last":
        return ckpt_path
    last = Path(output_dir) / "checkpoints" / "last.ckpt"
    return str(last) if last.exists() else None


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    validate(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    # data first: bad input fails here, before any model loads
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.load()
    tokenizer = load_tokenizer(BackboneConfig(**cfg.backbone))
    prompter = ChatPrompter(tokenizer, cfg.prompt.system_prompt, cfg.prompt.max_prompt_tokens)
    datamodule.filter_by_length(prompter.lengths)

    model = hydra.utils.instantiate(cfg.model, _convert_="all")
    callbacks = instantiate_group(cfg.get("callbacks"))
    persist_wandb_id(cfg)  # a resumed run (ckpt_path=last) logs to the same W&B run
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False
    )
    hparams = {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "hydra"}
    hparams = OmegaConf.to_container(OmegaConf.create(hparams), resolve=True)
    for lg in loggers:
        lg.log_hyperparams(hparams)

    trainer.fit(
        model,
        datamodule=datamodule,
        ckpt_path=resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.output_dir),
    )
    metrics = {
        k: float(v)
        for k, v in trainer.callback_metrics.items()
        if torch.is_tensor(v) and v.numel() == 1
    }
    return metrics, {"cfg": cfg, "model": model, "trainer": trainer, "datamodule": datamodule}


def metric_value(metrics: dict[str, float], name: str | None) -> float | None:
    if not name:
        return None
    if name not in metrics:
        raise KeyError(f"optimized_metric={name!r} was not logged; logged: {sorted(metrics)}")
    return metrics[name]
