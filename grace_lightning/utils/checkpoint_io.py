"""Checkpoint writes that a kill cannot corrupt (``trainer.plugins`` in conf/trainer/default.yaml).

Lightning's ``TorchCheckpointIO`` serialises to memory, then writes through an fsspec
transaction whose temp file lives in the SYSTEM temp dir (``tempfile.mkstemp``) and is moved into
place with ``shutil.move``. When the run dir is on another filesystem than ``/tmp`` (the usual
case on clusters: node-local /tmp, shared /scratch) that move is a copy into ``last.ckpt``, so a
``kill -9`` or a preemption mid-copy leaves a truncated ``last.ckpt`` and ``ckpt_path=last``
fails; the killed writer's multi-GB temp file also stays in /tmp. Here local checkpoints go to a
temp file next to the target, are fsynced and renamed (see ``utils/atomic.py``); remote URLs
(s3://, gs://, ...) keep Lightning's path, where object stores make uploads atomic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from grace_lightning.utils.atomic import atomic_open


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"`Trainer.save_checkpoint(..., storage_options=...)` is not supported by "
                f"{type(self).__name__}"
            )
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path)
            return
        with atomic_open(Path(path), "wb") as f:
            torch.save(checkpoint, f)  # straight to disk: no second in-memory copy


def _is_local(path: _PATH) -> bool:
    protocol = getattr(get_filesystem(str(path)), "protocol", "file")
    return "file" in ((protocol,) if isinstance(protocol, str) else tuple(protocol))
