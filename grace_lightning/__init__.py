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

from grace_lightning.schema import register as _register_schemas  # noqa: E402

_register_schemas()  # the typed config groups (conf/<group>/*.yaml: defaults: [schema])

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


# What third-party libraries print on every ``python train.py`` that is no concern of the user's
# (the first screen must show none of it: tests/test_first_screen.py). Each entry is one known
# message, matched exactly enough not to hide anything else.
_KNOWN_NOISE = (
    # the KL reference policy is frozen in eval mode on purpose (no dropout in the reference) and
    # the policy is put in train mode at on_train_epoch_start; Lightning warns before that hook
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # Lightning 2.6's own pytree helper constructs torch's deprecated LeafSpec; nothing to change
    # on our side (lightning/pytorch/utilities/_pytree.py)
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # trainer=cpu_bf16 / bf16-mixed (the quickstart): Lightning's model summary only says its MB
    # estimate assumes fp32 weights, which they are (autocast over fp32 weights)
    r"Precision bf16-mixed is not supported by the model summary",
)
_KNOWN_TIPS = ("💡 Tip:",)  # Lightning's advertisements (LitLogger / litmodels) at Trainer set-up


class _DropTips:
    """A logging filter that drops Lightning's ``💡 Tip: ...`` lines."""

    def filter(self, record) -> bool:
        return not str(record.getMessage()).startswith(_KNOWN_TIPS)


def quiet_known_noise() -> None:
    """Silence the third-party messages in ``_KNOWN_NOISE`` / ``_KNOWN_TIPS`` (idempotent).

    Called by ``grace_lightning.train.train`` before anything is built; targeted
    ``warnings.filterwarnings`` by message and a logging filter on Lightning's rank-zero loggers,
    so every other warning still shows.
    """
    import logging
    import warnings

    for pattern in _KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'grace_lightning' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
