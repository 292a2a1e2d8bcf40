"""Resuming a killed run in its own run dir (``ckpt_path=last``): W&B run id and rationale table.

- W&B: the first start writes the run id to ``<run dir>/wandb_id.txt``; a resumed start
  (``ckpt_path`` set) reads it back, so the run continues under the same id (Lightning's
  ``WandbLogger`` passes ``resume="allow"``). An explicit ``logger.wandb.id`` always wins.
- Rationale table: rows are appended at the end of every logged step, BEFORE the step's
  checkpoint is written. After a kill the table can hold rows of steps the checkpoint does not
  have (and a half-written last line); :class:`TrimTableOnResume` moves those to
  ``<table>.orphaned.jsonl`` when training resumes, so the table holds each step once.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, open_dict

from grace_lightning.utils.atomic import atomic_open

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_id.txt"


def new_run_id() -> str:
    return secrets.token_hex(4)  # 8 chars of [0-9a-f], as wandb.util.generate_id's length


def persist_wandb_id(cfg: DictConfig) -> str | None:
    """Fix ``cfg.logger.wandb.id`` (if that logger is on) and keep it in the run dir.

    Fresh start: a new id, written to ``wandb_id.txt``. Resume (``cfg.ckpt_path`` set) with the
    file present: its id. ``logger.wandb.id`` given: that id (and written). Ranks other than 0
    only read (their ``WandbLogger`` is a no-op anyway).
    """
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if not wandb_cfg:
        return None
    path = Path(cfg.paths.output_dir) / WANDB_ID_FILE
    saved = path.read_text().strip() if path.is_file() else None
    run_id = wandb_cfg.get("id") or (saved if cfg.get("ckpt_path") else None)
    if rank_zero_only.rank == 0:
        run_id = run_id or new_run_id()
        if run_id != saved:
            with atomic_open(path, "w") as f:
                f.write(run_id + "\n")
    with open_dict(cfg):
        cfg.logger.wandb.id = run_id
    return run_id


def trim_table(path: Path, last_step: int) -> int:
    """Move rows with ``step > last_step`` (and unreadable lines) to ``<stem>.orphaned.jsonl``.

    Rows are in step order, so everything from the first such line on goes. Returns the number
    of lines moved. The table is cut with ``truncate`` after the orphans are safely written.
    """
    if not path.is_file():
        return 0
    cut = None
    with open(path, "rb") as f:
        offset = 0
        for line in f:
            step = _row_step(line)
            if step is None or step > last_step:
                cut = offset
                break
            offset += len(line)
        if cut is None:
            return 0
        f.seek(cut)
        tail = f.read()
    with open(orphans_path(path), "ab") as out:
        out.write(tail if tail.endswith(b"\n") else tail + b"\n")
        out.flush()
        os.fsync(out.fileno())
    os.truncate(path, cut)
    return tail.count(b"\n") + (not tail.endswith(b"\n"))


def orphans_path(table: Path) -> Path:
    return table.with_name(table.stem + ".orphaned.jsonl")


def _row_step(line: bytes) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class TrimTableOnResume(L.Callback):
    """On a resumed fit, drop the rationale-table rows the checkpoint does not cover."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = getattr(pl_module, "table_path", None)
        if not trainer.ckpt_path or path is None or not trainer.is_global_zero:
            return
        moved = trim_table(Path(path), trainer.global_step)
        if moved:
            log.info(
                "resumed at step %d: moved %d rationale rows of later (lost) steps to %s",
                trainer.global_step,
                moved,
                orphans_path(Path(path)),
            )
