"""Export the trained policy as a plain transformers model at the end of training."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

# the implementation lives in grace_lightning.export (sentence-transformers files, model card)
from grace_lightning.export import save_policy

__all__ = ["ExportPolicy", "save_policy"]

log = logging.getLogger(__name__)


class ExportPolicy(L.Callback):
    """``save_pretrained`` the policy + tokenizer (+ ``grace_config.json``) into ``dirpath``.

    The export is what ``GraceEncoder.from_run_dir`` and plain ``AutoModelForCausalLM`` load.
    """

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.is_global_zero and not trainer.fast_dev_run:
            path = pl_module.export(self.dirpath)
            log.info("exported policy to %s", path)
