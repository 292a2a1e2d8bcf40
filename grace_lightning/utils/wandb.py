"""``WandbLogger`` whose online/offline mode follows ``WANDB_MODE`` unless the config forces it.

Lightning's ``WandbLogger(offline=True)`` sets ``WANDB_MODE=dryrun`` itself, so a config default
of ``offline: true`` silently beat ``WANDB_MODE=online`` in the environment. Here
``offline: null`` (conf/logger/wandb.yaml) means: offline unless ``WANDB_MODE`` is ``online``
(or ``run``/``disabled``, which W&B then handles); ``true``/``false`` force it.
"""

from __future__ import annotations

import os
from typing import Any

ONLINE_MODES = ("online", "run", "disabled")


def offline_from_env(offline: bool | None) -> bool:
    if offline is not None:
        return bool(offline)
    return os.environ.get("WANDB_MODE", "offline").strip().lower() not in ONLINE_MODES


def wandb_logger(offline: bool | None = None, **kwargs: Any):
    from lightning.pytorch.loggers.wandb import WandbLogger

    return WandbLogger(offline=offline_from_env(offline), **kwargs)
