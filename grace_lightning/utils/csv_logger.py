"""Lightning's CSVLogger with a crash-safe header rewrite (``logger=csv``).

Lightning appends rows to ``metrics.csv`` but, when a metric name appears for the first time
(e.g. validation metrics at the end of an epoch), REWRITES the whole file in place with the new
header: a kill during that rewrite truncates every row logged so far. Here the rewrite goes
through a temp file and an atomic rename (``utils/atomic.py``); appends stay appends.

Resuming (``ckpt_path=last``) opens a new ``csv/version_<n>/`` next to the old ones (never set
``logger.csv.version`` to an existing one: Lightning deletes that ``metrics.csv``). Steps
between the last checkpoint and the kill appear in both versions; the newer version is the run
that continued.
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from grace_lightning.utils.atomic import atomic_open


class AtomicRewriteWriter(ExperimentWriter):
    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            metrics = list(csv.DictReader(file))
        with atomic_open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(metrics)


class SafeCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> AtomicRewriteWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AtomicRewriteWriter(log_dir=self.log_dir)
        return self._experiment
