"""Export the trained policy as a plain transformers model at the end of training."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L

# the implementation lives in grace_lightning.export (sentence-transformers files, model card)
from grace_lightning.export.policy import save_policy

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
        # after every on_train_end (DevEvaluation's last scores and FinalEvaluation's reach the
        # model card, whichever order the callbacks run in)
        if trainer.is_global_zero and not trainer.fast_dev_run:
            self.add_dev_scores(trainer)
        if self.push_to_hub and trainer.is_global_zero and not trainer.fast_dev_run:
            from grace_lightning.export.hub import push_to_hub

            log.info("uploaded %s: %s", self.dirpath, push_to_hub(self.dirpath, self.push_to_hub))

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.fast_dev_run:
            return
        from grace_lightning.export.policy import export_options
        from grace_lightning.utils.fsdp import (
            full_state_dict,
            policy_swapped,
            submodule_state_dict,
            unsharded_policy_copy,
        )

        full = full_state_dict(trainer)  # None unless sharded; every rank must call it
        if not trainer.is_global_zero:
            return
        with export_options(extra_meta=run_labels(pl_module)):  # the model card's title
            if full is None:
                path = pl_module.export(self.dirpath)
            else:
                copy = unsharded_policy_copy(pl_module, submodule_state_dict(full, "policy"))
                with policy_swapped(pl_module, copy):
                    path = pl_module.export(self.dirpath)
        log.info("exported policy to %s", path)

    def add_dev_scores(self, trainer: L.Trainer) -> None:
        """The last dev evaluation -> ``grace_config.json`` ``dev`` + the model card."""
        config = self.dirpath / "grace_config.json"
        dev = last_dev_scores(trainer)
        if dev is None or not config.is_file():
            return
        from grace_lightning.export.card import write_model_card

        meta = json.loads(config.read_text(encoding="utf-8"))
        meta["dev"] = dev
        config.write_text(json.dumps(meta, indent=2), encoding="utf-8")
        run_dir = self.dirpath.parent if self.dirpath.name == "export" else None
        write_model_card(self.dirpath, run_dir=run_dir)


def run_labels(pl_module) -> dict[str, Any]:
    """What the model card's title needs beyond the module's own export meta: the reward."""
    reward = (dict(getattr(pl_module, "hparams", {}) or {}).get("reward") or {}).get("mode")
    return {"reward": reward} if reward else {}


def last_dev_scores(trainer: L.Trainer) -> dict[str, Any] | None:
    """The dev callback's last scores for the model card (``DevEvaluation.card_scores``: the
    final policy's when it scores at the end), or None. Found by its method, so this module does
    not import the dev callback (which imports this one for its best-checkpoint export)."""
    for cb in getattr(trainer, "callbacks", None) or []:
        if callable(getattr(cb, "card_scores", None)):
            return cb.card_scores(trainer)
    return None
