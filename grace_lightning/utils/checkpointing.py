"""Checkpoint cadence in rollout batches (or minutes), and a checkpoint when training ends.

Lightning's ``ModelCheckpoint(every_n_train_steps=N)`` fires when ``global_step % N == 0``.
GRACE takes several optimiser steps per rollout batch (``data.prompts_per_step /
algo.prompts_per_minibatch x algo.num_iterations``; paper recipe 64 / 16 = 4), and the step
check runs once per rollout batch, so the global step moves in fours and N=50 fires only at
multiples of 100. A skipped (non-finite) optimiser step shifts the count further. Upstream (verl)
counts ``save_freq=50`` in rollout batches.

:class:`RolloutCheckpoint` counts rollout batches itself (one ``on_train_batch_end`` = one
rollout batch) and keeps the count in its checkpointed state, so a resumed run goes on counting
where it stopped. ``every_n_minutes`` adds a wall-clock cadence (rank 0's clock decides, all
ranks save together). When training ends (``max_steps``/``max_epochs`` reached, or a stop) the
final state is saved too, unless it was just saved.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


class RolloutCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that saves every N rollout batches and/or every M minutes, and at the end.

    Args:
        every_n_rollout_batches: save after every N-th rollout batch (upstream ``save_freq``);
            None or 0 = off.
        every_n_minutes: also save when this much wall-clock time passed since the last save
            check; None = off.
        save_on_train_end: save the final state when training ends (if not saved at that step).
        **kwargs: ``ModelCheckpoint`` arguments (``dirpath``, ``filename``, ``save_last``,
            ``save_top_k``, ``every_n_epochs``, ...). ``every_n_train_steps`` keeps Lightning's
            meaning (optimiser steps, checked once per rollout batch) for old configs; prefer
            ``every_n_rollout_batches``. ``train_time_interval`` is refused (a timedelta cannot
            come from YAML): use ``every_n_minutes``.
    """

    def __init__(
        self,
        every_n_rollout_batches: int | None = 50,
        every_n_minutes: float | None = None,
        save_on_train_end: bool = True,
        **kwargs: Any,
    ) -> None:
        if kwargs.pop("train_time_interval", None):
            raise ValueError("callbacks.model_checkpoint.train_time_interval: use every_n_minutes")
        if every_n_rollout_batches is not None and int(every_n_rollout_batches) < 0:
            raise ValueError(
                f"callbacks.model_checkpoint.every_n_rollout_batches={every_n_rollout_batches}: "
                f"must be >= 0 (0 or null = off)"
            )
        if every_n_minutes is not None and float(every_n_minutes) <= 0:
            raise ValueError(
                f"callbacks.model_checkpoint.every_n_minutes={every_n_minutes}: must be > 0 "
                f"(null = off)"
            )
        kwargs.setdefault("every_n_epochs", 0)
        kwargs["every_n_train_steps"] = kwargs.get("every_n_train_steps") or 0
        super().__init__(**kwargs)
        self.every_n_rollout_batches = int(every_n_rollout_batches or 0)
        self.every_n_minutes = None if every_n_minutes is None else float(every_n_minutes)
        self.save_on_train_end = bool(save_on_train_end)
        self.rollout_batches = 0  # rollout batches finished (restored on resume)
        self._last_save_time = time.monotonic()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_save_time = time.monotonic()

    def _due(self, trainer: L.Trainer) -> bool:
        n = self.every_n_rollout_batches
        due = bool(n) and self.rollout_batches % n == 0
        if self.every_n_minutes is not None:
            late = (time.monotonic() - self._last_save_time) / 60.0 >= self.every_n_minutes
            due = due or bool(trainer.strategy.broadcast(late))  # rank 0's clock decides
        return due

    def _save_now(self, trainer: L.Trainer) -> None:
        candidates = self._monitor_candidates(trainer)
        if self.monitor is not None and self.monitor not in candidates:
            self._defer_save_until_validation = True  # Lightning saves after validation
            return
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
        self._last_save_time = time.monotonic()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        self.rollout_batches += 1
        if self._due(trainer) and not self._should_skip_saving_checkpoint(trainer):
            self._save_now(trainer)
        # Lightning's optimiser-step cadence (every_n_train_steps), when an old config sets it
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_on_train_end and not self._should_skip_saving_checkpoint(trainer):
            log.info("saving the final checkpoint (step %d)", trainer.global_step)
            self._save_now(trainer)
        else:
            super().on_train_end(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rollout_batches": self.rollout_batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.rollout_batches = int(state_dict.get("rollout_batches", 0))
