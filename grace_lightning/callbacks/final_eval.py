"""Evaluate the exported model on an eval suite when training ends (``train.py eval=<suite>``).

This is ``python eval.py model=<run dir> eval=<suite> mode=<mode>`` run inside the training job.
Results go to ``<run dir>/eval/`` (``scores.json``, ``results.md``, ...). The callback logs
``eval/avg`` and ``eval/<category>`` (Retr ... Summ) to the run's loggers and puts them in
``trainer.callback_metrics``. That makes ``optimized_metric=eval/avg`` something ``train.py``
returns to Hydra sweepers, and something W&B sweeps can optimise.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from grace_lightning.callbacks.export import ExportPolicy

log = logging.getLogger(__name__)


def _plain(x: Any) -> Any:
    return OmegaConf.to_container(x, resolve=True) if isinstance(x, DictConfig) else x


class FinalEvaluation(L.Callback):
    """Run an eval suite on ``export_dir`` after ``ExportPolicy`` wrote it; no-op without a suite.

    Args:
        suite: an eval suite config (``conf/eval/<name>.yaml``, selected with ``eval=<name>``);
            None turns the callback off.
        export_dir: where ``ExportPolicy`` saved the model (exported here if it is missing).
        output_dir: where the results go (``<run dir>/eval``).
        mode: ``rationale`` | ``base`` | ``auto``, where auto takes the module's
            ``embedding_mode`` (rationale for GRACE, base for the contrastive baselines).
        tasks: evaluate only these tasks of the suite (None: all).
        batch_size: texts per forward / generation batch.
        generation: rationale sampling (``GenerationSettings``: temperature, max_new_tokens,
            top_p, top_k, seed).
        cache_path: the rationale cache (SQLite). None: no cache.
        device, dtype: None means eval.py's defaults (cuda if available; the saved dtype).
        overwrite: mteb overwrite strategy for results already in ``output_dir``.
        label: the row label in the results table (None: "<backbone> <method> (<mode>)").
    """

    def __init__(
        self,
        suite: dict | None,
        export_dir: str,
        output_dir: str,
        mode: str = "auto",
        tasks: list[str] | None = None,
        batch_size: int = 16,
        generation: dict | None = None,
        cache_path: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        overwrite: str = "only-missing",
        progress_bar: bool = False,
        label: str | None = None,
    ):
        self.suite = _plain(suite)
        self.export_dir, self.output_dir = Path(export_dir), Path(output_dir)
        self.mode, self.tasks = mode, _plain(tasks)
        self.batch_size, self.generation = batch_size, _plain(generation) or {}
        self.cache_path, self.device, self.dtype = cache_path, device, dtype
        self.overwrite, self.progress_bar, self.label = overwrite, progress_bar, label
        self.result: dict[str, Any] | None = None

    def eval_config(self, mode: str, label: str | None = None) -> DictConfig:
        """The ``conf/eval.yaml``-shaped config that ``grace_lightning.eval.run.evaluate`` takes."""
        return OmegaConf.create(
            {
                "model": str(self.export_dir),
                "mode": mode,
                "label": self.label or label,
                "device": self.device,
                "dtype": self.dtype,
                "batch_size": self.batch_size,
                "tasks": self.tasks,
                "task_seed": 42,
                "overwrite": self.overwrite,
                "progress_bar": self.progress_bar,
                "generation": self.generation,
                "prompt": {"system_prompt": None, "max_prompt_tokens": None},
                "cache": {"enabled": self.cache_path is not None, "path": self.cache_path},
                "wandb": {"enabled": False},
                "eval": self.suite,
                "paths": {"output_dir": str(self.output_dir)},
            }
        )

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if not self.suite or not trainer.is_global_zero or trainer.fast_dev_run:
            return
        from grace_lightning.eval.run import evaluate

        exported = any(
            isinstance(cb, ExportPolicy) and cb.dirpath == self.export_dir
            for cb in trainer.callbacks
        )
        if not exported:  # no ExportPolicy writes this dir (it runs first when it does)
            pl_module.export(self.export_dir)
        mode = self.mode
        if mode == "auto":
            mode = getattr(pl_module, "embedding_mode", "rationale")
        log.info("final evaluation: suite %s, mode %s", self.suite.get("name"), mode)
        backbone = getattr(getattr(pl_module, "backbone_cfg", None), "name", "model")
        label = f"{backbone} {getattr(pl_module, 'objective', 'grace')} ({mode})"
        self.result = evaluate(self.eval_config(mode, label))
        metrics = eval_metrics(self.result)
        for name, value in metrics.items():
            trainer.callback_metrics[name] = torch.tensor(value)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()


def eval_metrics(run: dict[str, Any]) -> dict[str, float]:
    """``eval/avg`` and ``eval/<category>`` from an ``evaluate`` summary (``scores.json``)."""
    out: dict[str, float] = {}
    if run.get("avg") is not None:
        out["eval/avg"] = float(run["avg"])
    for cat, value in (run.get("categories") or {}).items():
        if value is not None:
            out[f"eval/{cat}"] = float(value)
    return out
