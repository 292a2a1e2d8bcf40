"""Writing an export: a policy (and tokenizer) saved as a transformers model that is also a
sentence-transformers model (see :mod:`grace_lightning.export`). Imports nothing of the
training code: ``GraceModule.export`` / ``ContrastiveModule.export`` and the export callback
call :func:`save_policy` from here."""

from __future__ import annotations

import contextlib
import contextvars
import copy
import json
import logging
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ST_MODULE_FILE = "grace_embedding.py"  # copied into every export
ST_CLASS_REF = "grace_embedding.GraceEmbedding"  # modules.json "type"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF default is


# options for save_policy while export_checkpoint runs module.export (which passes none)
_OPTIONS: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "grace_export_options", default=None
)


# ----------------------------------------------------------------------------- writing an export
def base_model_id(policy) -> str | None:
    """The Hub id the policy was fine-tuned from, if it has one (model card ``base_model``)."""
    name = str(getattr(policy.config, "_name_or_path", "") or getattr(policy, "name_or_path", ""))
    if not name:
        return None
    if "smollm2" in name.lower() and Path(name).exists():  # the embedded GGUF default, converted
        return SMOLLM2_HUB_ID
    if Path(name).exists() or name.startswith(("/", ".")) or name.count("/") != 1:
        return None
    return name


def export_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """``grace_config.json``: the module's meta + embedding mode + eval generation settings."""
    from grace_lightning.export.grace_embedding import GENERATION_DEFAULTS

    meta = dict(meta)
    meta.setdefault("embedding_mode", "rationale")
    generation = dict(GENERATION_DEFAULTS)
    rollout_tokens = (meta.get("rollout") or {}).get("max_new_tokens")
    if rollout_tokens:  # evaluate with rationales as long as the training rollouts
        generation["max_new_tokens"] = int(rollout_tokens)
    meta.setdefault("generation", generation)
    meta.setdefault("prompts", None)  # optional {query, document, <TaskName>-query, ...}
    return meta


@contextlib.contextmanager
def export_options(**options: Any):
    """Options for the ``save_policy`` calls in the block (``extra_meta``: merged into
    ``grace_config.json``; ``merge``; ``run_dir``), for callers that reach it through a module's
    ``export`` (which passes none)."""
    token = _OPTIONS.set({**(_OPTIONS.get() or {}), **options})
    try:
        yield
    finally:
        _OPTIONS.reset(token)


@contextlib.contextmanager
def no_progress_bars():
    """transformers' (and huggingface_hub's) tqdm bars off for the block, e.g. save_pretrained's
    "Writing model shards" bar at every export; restored after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def save_policy(
    policy,
    tokenizer,
    directory: str | Path,
    meta: dict,
    peft: bool,
    *,
    merge: bool = True,
    sentence_transformers: bool = True,
    model_card: bool = True,
    run_dir: str | Path | None = None,
) -> Path:
    """``save_pretrained`` model + tokenizer + ``grace_config.json`` (+ sentence-transformers files
    and a model card). With PEFT the adapter goes to ``adapter/`` and a merged plain model to
    ``directory``; ``merge=False`` writes only the adapter, into ``directory`` itself."""
    opts = _OPTIONS.get() or {}
    merge = opts.get("merge", merge)
    run_dir = opts.get("run_dir", run_dir)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = export_meta({**meta, **opts.get("extra_meta", {})})
    meta.setdefault("base_model", base_model_id(policy))
    with no_progress_bars():  # an export prints its path, not a shards bar
        if peft and not merge:
            policy.save_pretrained(directory)  # adapter_config.json + adapter_model.safetensors
            meta["adapter_only"] = True
        else:
            if peft:
                policy.save_pretrained(directory / "adapter")
                policy = copy.deepcopy(policy).merge_and_unload()
            policy.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    (directory / "grace_config.json").write_text(json.dumps(meta, indent=2))
    if sentence_transformers:
        write_sentence_transformers_files(directory, meta)
    if model_card:
        from grace_lightning.export.card import write_model_card

        run = (
            Path(run_dir) if run_dir else (directory.parent if directory.name == "export" else None)
        )
        write_model_card(directory, run_dir=run)
    return directory


def write_sentence_transformers_files(directory: str | Path, meta: dict | None = None) -> None:
    """``modules.json`` + ``config_sentence_transformers.json`` + the module's Python file."""
    directory = Path(directory)
    if meta is None:
        meta = json.loads((directory / "grace_config.json").read_text(encoding="utf-8"))
    shutil.copyfile(Path(__file__).with_name(ST_MODULE_FILE), directory / ST_MODULE_FILE)
    modules = [{"idx": 0, "name": "0", "path": "", "type": ST_CLASS_REF, "kwargs": ["mode"]}]
    (directory / "modules.json").write_text(json.dumps(modules, indent=2))
    sp = meta.get("system_prompt")
    prompts = {"query": sp, "document": sp, **(meta.get("prompts") or {})}
    (directory / "config_sentence_transformers.json").write_text(
        json.dumps(
            {
                "model_type": "SentenceTransformer",
                "__version__": _versions(),
                # sentence-transformers "prompts" are GRACE SYSTEM prompts (not text prefixes)
                "prompts": prompts,
                "default_prompt_name": None,
                "similarity_fn_name": "cosine",
            },
            indent=2,
        )
    )


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name, dist in (
        ("sentence_transformers", "sentence-transformers"),
        ("transformers", "transformers"),
        ("pytorch", "torch"),
    ):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(dist)
    return out
