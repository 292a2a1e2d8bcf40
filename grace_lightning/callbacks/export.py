"""Export the trained policy as a plain transformers model at the end of training."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import lightning as L

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


def save_policy(policy, tokenizer, directory: str | Path, meta: dict, peft: bool) -> Path:
    """``save_pretrained`` model + tokenizer + ``grace_config.json``; with PEFT the adapter goes
    to ``adapter/`` and a merged plain model to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if peft:
        policy.save_pretrained(directory / "adapter")
        policy = copy.deepcopy(policy).merge_and_unload()
    policy.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "grace_config.json").write_text(json.dumps(meta, indent=2))
    return directory
