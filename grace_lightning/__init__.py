"""grace_lightning: GRACE (arXiv 2510.04506) training and evaluation on PyTorch Lightning.

Public names (imported lazily, so ``import grace_lightning`` stays light):

- :class:`GraceEncoder` / :class:`GenerationSettings`: a GRACE policy as a sentence-transformers
  shaped text encoder (``GraceEncoder.from_pretrained(<run dir | export | Hub id>)``);
- :func:`export_run` / :func:`export_checkpoint` (``python -m grace_lightning.export``): a run dir or ``.ckpt`` -> an export that
  transformers, sentence-transformers (``trust_remote_code=True``) and MTEB load;
- :func:`grace_model_meta`: an ``mteb.ModelMeta`` whose loader builds the model from a path;
- :data:`DEFAULT_SYSTEM_PROMPT`: the upstream system prompt.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "GraceEncoder": ("grace_lightning.eval.encoder", "GraceEncoder"),
    "GenerationSettings": ("grace_lightning.eval.encoder", "GenerationSettings"),
    "export_run": ("grace_lightning.export", "export_run"),
    "export_checkpoint": ("grace_lightning.export", "export_checkpoint"),
    "grace_model_meta": ("grace_lightning.eval.mteb_model", "grace_model_meta"),
    "GraceMTEBModel": ("grace_lightning.eval.mteb_model", "GraceMTEBModel"),
    "DEFAULT_SYSTEM_PROMPT": ("grace_lightning.prompts", "DEFAULT_SYSTEM_PROMPT"),
}

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "GenerationSettings",
    "GraceEncoder",
    "GraceMTEBModel",
    "__version__",
    "export_checkpoint",
    "export_run",
    "grace_model_meta",
]

if TYPE_CHECKING:
    from grace_lightning.eval.encoder import GenerationSettings, GraceEncoder
    from grace_lightning.eval.mteb_model import GraceMTEBModel, grace_model_meta
    from grace_lightning.export import export_checkpoint, export_run
    from grace_lightning.prompts import DEFAULT_SYSTEM_PROMPT


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'grace_lightning' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
