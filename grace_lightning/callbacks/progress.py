"""The training progress bar: the time budget's ETA, and progress inside a rollout batch.

`TimeBudgetProgressBar` (Lightning's TQDM bar; ``train.py`` puts it in place of Lightning's default
when ``trainer.enable_progress_bar``): when ``trainer.max_time`` ends training before the epoch
does, the bar's total becomes the number of batches that fit in the time left, so its count and ETA
follow the budget (``12/58 [01:31<07:29]`` for a 9-minute budget, not ``12/731 [01:31<1:41:38]``).
When ``trainer.max_steps`` ends training first, the total is the rollout batches its optimiser steps
leave (a GRACE rollout batch takes ``ceil(prompts_per_step / prompts_per_minibatch) x
num_iterations`` steps: `batches_in_steps`).


A paper-size rollout batch (640 rows x up to 2048 tokens) takes minutes between two training
steps; Lightning's bar only moves at the end of a step. `RolloutProgress` hands the rollout engine
(``pl_module.engine``, an `HFRolloutEngine`) a ``progress`` hook, which the sampling loop calls
every ``rollout.progress_every`` decode steps with (rows_finished, rows_total, tokens_generated,
elapsed_s). With Lightning's bar the numbers join the metrics (TQDM postfix or Rich metrics
column: ``rollout: 37/640 rows, 412 tok/s``); without a bar (SLURM logs, ``enable_progress_bar=false``) they are logged at most every
``log_every_s`` seconds on rank 0.
"""

from __future__ import annotations

import logging
import math
import time

import lightning as L
from lightning.pytorch.callbacks import Timer, TQDMProgressBar

log = logging.getLogger(__name__)


def batches_in_budget(done: int, elapsed_s: float, left_s: float, natural: float | None) -> int:
    """The epoch's batch count as the time budget sees it: ``done`` so far plus what fits in
    ``left_s`` at this epoch's pace (``elapsed_s / done`` seconds a batch), at most ``natural``
    (the epoch's own count; None/inf when unknown). At least ``done``."""
    if done <= 0 or elapsed_s <= 0:
        return int(natural) if natural not in (None, math.inf) else done
    fits = done + math.ceil(max(left_s, 0.0) * done / elapsed_s)
    return fits if natural in (None, math.inf) else int(min(fits, natural))


def batches_in_steps(steps_left: int, steps_per_batch: int, done: int, natural: float | None):
    """The epoch's batch count as ``trainer.max_steps`` sees it: ``done`` batches of this epoch so
    far plus the batches that ``steps_left`` optimiser steps take (``steps_per_batch`` each), at
    most ``natural`` (None/inf: unknown)."""
    fits = done + math.ceil(max(steps_left, 0) / max(steps_per_batch, 1))
    return fits if natural in (None, math.inf) else int(min(fits, natural))


def steps_per_batch(pl_module) -> int:
    """Optimiser steps a training batch takes: a GRACE rollout batch's mini-batches x
    num_iterations (``GraceModule.steps_per_rollout``); 1 for the contrastive baselines."""
    fn = getattr(pl_module, "steps_per_rollout", None)
    return max(1, int(fn())) if callable(fn) else 1


class TimeBudgetProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar whose total and ETA follow ``trainer.max_time`` when it binds.

    Without a ``Timer`` (no ``max_time``) or when the epoch ends before the budget, it is the plain
    TQDM bar. ``budget_total``: the total the budget last set (None: it never bound).
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False):
        super().__init__(refresh_rate, process_position, leave)
        self._epoch_start: float | None = None
        self._epoch_total: float | None = None
        self.budget_total: int | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._epoch_start = time.monotonic()
        self._epoch_total = self.train_progress_bar.total  # the epoch's own count (or None)
        if trainer.max_steps is not None and trainer.max_steps > 0:  # the step cap binds first?
            self._epoch_total = batches_in_steps(
                trainer.max_steps - trainer.global_step,
                steps_per_batch(trainer.lightning_module),
                int(self.train_progress_bar.n or 0),
                self._epoch_total,
            )
            self.train_progress_bar.total = self._epoch_total

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.follow_budget(trainer, batch_idx + 1)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def follow_budget(self, trainer: L.Trainer, done: int) -> None:
        """Set the bar's total to what fits in the Timer's remaining time (if that is fewer)."""
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        left = timer.time_remaining("train") if timer is not None else None
        if left is None or self._epoch_start is None or self._train_progress_bar is None:
            return
        total = batches_in_budget(
            done, time.monotonic() - self._epoch_start, left, self._epoch_total
        )
        binds = self._epoch_total is None or total < self._epoch_total
        self.budget_total = total if binds else None
        self.train_progress_bar.total = total  # the epoch's own count again once it fits


class RolloutProgress(L.Callback):
    def __init__(self, log_every_s: float = 60.0):
        self.log_every_s = log_every_s
        self.last: tuple[int, int, int, float] | None = None  # the latest report (tests, debugging)
        self._last_log = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        engine = getattr(pl_module, "engine", None)
        if engine is not None and hasattr(engine, "progress"):
            engine.progress = lambda *report: self.show(trainer, pl_module, *report)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        engine = getattr(pl_module, "engine", None)
        if engine is not None and hasattr(engine, "progress"):
            engine.progress = None

    def show(
        self, trainer: L.Trainer, pl_module, rows_done: int, rows: int, tokens: int, elapsed: float
    ) -> None:
        """The engine's hook: one report of the rollout batch being sampled."""
        self.last = (rows_done, rows, tokens, elapsed)
        if not trainer.is_global_zero:
            return
        text = f"{rows_done}/{rows} rows, {tokens / max(elapsed, 1e-9):.0f} tok/s"
        bar_callback = trainer.progress_bar_callback
        bar = getattr(bar_callback, "_train_progress_bar", None)  # TQDMProgressBar's, once shown
        if bar is not None and not bar.disable:
            metrics = bar_callback.get_metrics(trainer, pl_module)
            bar.set_postfix({**metrics, "rollout": text})
            return
        column = getattr(bar_callback, "_metric_component", None)  # RichProgressBar's metrics text
        if column is not None and bar_callback.is_enabled:
            column.update({**bar_callback.get_metrics(trainer, pl_module), "rollout": text})
            bar_callback.refresh()
            return
        now = time.monotonic()
        if rows_done == rows or now - self._last_log >= self.log_every_s:
            self._last_log = now
            log.info("rollout: %s (%d tokens, %.0f s)", text, tokens, elapsed)
