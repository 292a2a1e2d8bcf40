"""Progress inside a rollout batch: rows finished and tokens/s on the progress bar.

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
import time

import lightning as L

log = logging.getLogger(__name__)


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
