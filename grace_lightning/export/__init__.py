"""Exports: a trained policy as a transformers model that is also a sentence-transformers model.

An export directory holds

- ``config.json``, ``model.safetensors``, tokenizer files: a plain ``save_pretrained`` causal LM
  (``AutoModelForCausalLM.from_pretrained(export)`` loads it); with ``--adapter-only`` instead
  ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT; the base model is fetched);
- ``grace_config.json``: system prompt, prompt length, embedding mode, generation settings,
  training summary;
- ``modules.json`` + ``config_sentence_transformers.json`` + ``grace_embedding.py``: a
  sentence-transformers model whose one module (:mod:`grace_lightning.export.grace_embedding`,
  self-contained) embeds like :class:`grace_lightning.GraceEncoder`;
- ``README.md``: a model card (:mod:`grace_lightning.export.card`).

Entry points: :func:`save_policy` (what ``GraceModule.export`` / ``ContrastiveModule.export``
call), :func:`export_checkpoint` (any ``.ckpt``), :func:`export_run` (a run dir) and
``python -m grace_lightning.export <run dir | .ckpt> [out] [--adapter-only] [--push-to-hub ID]``.
Layers: :mod:`~grace_lightning.export.policy` writes an export and imports no training code (the
training modules and the export callback use it); :mod:`~grace_lightning.export.checkpoint` builds
a training module from a ``.ckpt`` and exports it, so it is imported here lazily, on first use.
"""

from __future__ import annotations

from typing import Any

from grace_lightning.export.policy import (
    SMOLLM2_HUB_ID,
    ST_CLASS_REF,
    ST_MODULE_FILE,
    base_model_id,
    export_meta,
    export_options,
    no_progress_bars,
    save_policy,
    write_sentence_transformers_files,
)

_FROM_CHECKPOINT = (
    "ExportError",
    "export_checkpoint",
    "export_run",
    "find_checkpoint",
    "load_module_from_checkpoint",
    "refresh_export",
)


def __getattr__(name: str) -> Any:  # PEP 562: the checkpoint half loads on first use
    if name in _FROM_CHECKPOINT:
        from grace_lightning.export import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SMOLLM2_HUB_ID",
    "ST_CLASS_REF",
    "ST_MODULE_FILE",
    "ExportError",
    "base_model_id",
    "export_meta",
    "find_checkpoint",
    "load_module_from_checkpoint",
    "export_checkpoint",
    "export_options",
    "export_run",
    "no_progress_bars",
    "refresh_export",
    "save_policy",
    "write_sentence_transformers_files",
]
