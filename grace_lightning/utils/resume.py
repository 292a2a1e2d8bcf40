"""Resuming a killed run in its own run dir (``ckpt_path=last``): the checkpoint, the W&B run id
and the rationale table.

- Checkpoint: ``ckpt_path=last`` takes the newest checkpoint of the run dir that loads
  (:func:`resolve_ckpt_path`): ``checkpoints/last.ckpt``, the periodic ``checkpoints/*.ckpt`` and
  the ``hpc_ckpt_<n>.ckpt`` Lightning saves on the SLURM requeue signal, newest first. A file cut
  short (a full disk, a bad copy) is skipped with a warning naming it; none at all is a fresh start.
- W&B: the first start writes the run id to ``<run dir>/wandb_id.txt``; a resumed start
  (``ckpt_path`` set) reads it back, so the run continues under the same id (Lightning's
  ``WandbLogger`` passes ``resume="allow"``). An explicit ``logger.wandb.id`` always wins. Under
  ``wandb agent`` (``WANDB_SWEEP_ID`` set) the agent names the run: no id is set or kept.
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
import zipfile
from pathlib import Path

import lightning as L
import torch
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
    only read (their ``WandbLogger`` is a no-op anyway). A run started by ``wandb agent``
    (``WANDB_SWEEP_ID``): nothing (W&B ignores a given id there and uses the agent's).
    """
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if not wandb_cfg or os.environ.get("WANDB_SWEEP_ID"):
        return None  # under `wandb agent` the run id is the agent's (WANDB_RUN_ID)
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


def checkpoint_candidates(output_dir: str | Path) -> list[Path]:
    """The run dir's checkpoints, newest (modification time) first: ``checkpoints/last.ckpt``
    first among equals, then the periodic ``checkpoints/*.ckpt`` and ``hpc_ckpt_<n>.ckpt``."""
    run_dir = Path(output_dir)
    found = [*(run_dir / "checkpoints").glob("*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    mtimes = {}
    for p in found:
        try:
            mtimes[p] = p.stat().st_mtime
        except FileNotFoundError:  # moved aside by rank 0 meanwhile
            continue
    return sorted(mtimes, key=lambda p: (-mtimes[p], p.name != "last.ckpt", p.name))


def unreadable_reason(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from (None: it loads). A file: its zip central directory and
    its pickle load (``torch.load(mmap=True)``: no tensor data is read). A directory (FSDP
    ``state_dict_type: sharded``): its ``.metadata``, written when the save completed."""
    if path.is_dir():
        return None if (path / ".metadata").is_file() else "no .metadata (an unfinished save)"
    try:
        with zipfile.ZipFile(path):  # a file cut short has no zip central directory (at its end)
            pass
    except (zipfile.BadZipFile, OSError) as e:
        return f"not a whole zip archive, cut short? ({e})"
    try:
        torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # noqa: BLE001 (BadZipFile, torch's RuntimeError, unpickling errors)
        first_line = str(e).splitlines()[0] if str(e) else ""
        return f"{type(e).__name__}: {first_line}"
    return None


UNREADABLE_SUFFIX = ".unreadable"


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | Path) -> str | None:
    """``ckpt_path=last``: the newest checkpoint of the run dir that loads, a warning naming each
    newer one skipped; None (a fresh start) if the run dir has none. Any other value is kept.

    The skipped ones are renamed ``<name>.unreadable`` (rank 0; kept for inspection): otherwise
    Lightning, finding a ``last.ckpt`` that is not the one it resumed from, would write the next
    one as ``last-v1.ckpt`` beside the torn file. Raises ``RuntimeError`` when checkpoints exist
    but none loads (rather than silently restarting from scratch over them)."""
    if ckpt_path != "last":
        return ckpt_path
    skipped: list[tuple[Path, str]] = []
    for path in checkpoint_candidates(output_dir):
        reason = unreadable_reason(path)
        if reason is None:
            for bad, why in skipped:
                aside = bad.with_name(bad.name + UNREADABLE_SUFFIX)
                if rank_zero_only.rank == 0 and bad.exists():
                    try:
                        os.replace(bad, aside)
                    except OSError as e:  # e.g. a non-empty directory of that name
                        log.warning("could not move %s aside: %s", bad, e)
                log.warning(
                    "ckpt_path=last: skipped %s, it does not load (%s); moved it to %s",
                    bad,
                    why,
                    aside.name,
                )
            if skipped:
                log.warning("ckpt_path=last: resuming from %s", path)
            return str(path)
        skipped.append((path, reason))
    if skipped:
        raise RuntimeError(
            "ckpt_path=last: no checkpoint in "
            f"{output_dir} loads: {'; '.join(f'{p} ({why})' for p, why in skipped)}. Pass "
            "ckpt_path=<a checkpoint file> or "
            "move these away to start afresh."
        )
    return None


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
