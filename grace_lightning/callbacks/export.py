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
    Under FSDP the weights are sharded: every rank takes part in gathering the full state dict
    (a collective), then rank 0 exports an unsharded copy of the policy holding it.
    """

    def __init__(self, dirpath: str, push_to_hub: str | None = None):
        self.dirpath = Path(dirpath)
        self.push_to_hub = push_to_hub  # a Hub repo id: upload when fit ends (Hub only)

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        # after every on_train_end (FinalEvaluation's scores then reach the model card)
        if self.push_to_hub and trainer.is_global_zero and not trainer.fast_dev_run:
            from grace_lightning.export.hub import push_to_hub

            log.info("uploaded %s: %s", self.dirpath, push_to_hub(self.dirpath, self.push_to_hub))

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.fast_dev_run:
            return
        from grace_lightning.utils.fsdp import (
            full_state_dict,
            policy_swapped,
            submodule_state_dict,
            unsharded_policy_copy,
        )

        full = full_state_dict(trainer)  # None unless sharded; every rank must call it
        if not trainer.is_global_zero:
            return
        if full is None:
            path = pl_module.export(self.dirpath)
        else:
            copy = unsharded_policy_copy(pl_module, submodule_state_dict(full, "policy"))
            with policy_swapped(pl_module, copy):
                path = pl_module.export(self.dirpath)
        log.info("exported policy to %s", path)
