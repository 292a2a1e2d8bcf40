"""Find and check an exported model before transformers sees it.

A training run writes ``<run>/export/`` at the end (``callbacks/export.py``: ``save_pretrained``
model + tokenizer + ``grace_config.json``). A run that was killed, or an export copied half-way,
otherwise fails deep inside transformers; here it fails naming the missing or corrupt file.
Safetensors files are checked against their own header (data offsets vs file size), so a
truncated file is caught without reading the weights.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any


class RunDirError(RuntimeError):
    """A run/export directory is missing, incomplete or corrupt."""


def find_export_dir(path: str | Path) -> Path:
    """``<run>/export`` for a run dir, or ``path`` itself if it already holds a model."""
    path = Path(path)
    if not path.exists():
        raise RunDirError(f"{path}: no such run or export directory")
    if not path.is_dir():
        raise RunDirError(f"{path}: not a directory (expected a run dir or its export/)")
    if (path / "export").is_dir():
        return path / "export"
    if any(
        (path / f).exists() for f in ("config.json", "grace_config.json", "adapter_config.json")
    ):
        return path
    hint = " Give a train.py run dir, its export/, or a .ckpt (eval.py model=<path.ckpt>)."
    if (path / "checkpoints").is_dir():
        hint = (
            " It has checkpoints/ but no export/ (written when training ends): export a "
            f"checkpoint with `python -m grace_lightning.export {path}`, or evaluate one "
            f"directly with `python eval.py model={path}/checkpoints/last.ckpt`."
        )
    raise RunDirError(
        f"{path}: neither a run dir (no export/) nor an export dir (no config.json).{hint}"
    )


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise RunDirError(f"{path.parent}: {path.name} is missing ({what})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path}: corrupt {what} (not valid JSON: {e})") from None


def check_safetensors(path: Path) -> None:
    """Header sanity: 8-byte length, JSON header, data offsets that end exactly at end of file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file ({size} bytes)")
            header = json.loads(f.read(n))
    except (ValueError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path}: corrupt safetensors file ({e})") from None
    end = max(
        (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0
    )
    if 8 + n + end != size:
        raise RunDirError(
            f"{path}: truncated or corrupt safetensors file (header says {8 + n + end} bytes, "
            f"file has {size}): a half-written export?"
        )


def check_export_dir(export: Path) -> dict[str, Any]:
    """Check config, weights and tokenizer files; return ``grace_config.json`` ({} if absent).

    An adapter-only export (``adapter_config.json``, ``python -m grace_lightning.export
    --adapter-only``) needs its adapter weights and tokenizer; the base model is fetched on load.
    """
    export = Path(export)
    if (export / "adapter_config.json").exists() and not (export / "config.json").exists():
        _check_adapter(export)
        _check_tokenizer(export)
        grace = export / "grace_config.json"
        return dict(_read_json(grace, "GRACE export config")) if grace.exists() else {}
    config = _read_json(export / "config.json", "model config")
    if not isinstance(config, dict) or not (
        config.get("model_type") or config.get("architectures")
    ):
        raise RunDirError(f"{export / 'config.json'}: not a transformers model config")

    index = export / "model.safetensors.index.json"
    if (export / "model.safetensors").exists():
        check_safetensors(export / "model.safetensors")
    elif index.exists():
        shards = sorted(set(_read_json(index, "weight index").get("weight_map", {}).values()))
        for shard in shards:
            if not (export / shard).is_file():
                raise RunDirError(
                    f"{export}: weight shard {shard} (listed in {index.name}) is missing"
                )
            check_safetensors(export / shard)
    elif not any(export.glob("pytorch_model*.bin")):
        raise RunDirError(
            f"{export}: no weights (model.safetensors, model.safetensors.index.json + shards, "
            f"or pytorch_model.bin)"
        )

    _check_tokenizer(export)
    grace = export / "grace_config.json"
    return dict(_read_json(grace, "GRACE export config")) if grace.exists() else {}


def _check_adapter(export: Path) -> None:
    cfg = _read_json(export / "adapter_config.json", "PEFT adapter config")
    if (export / "adapter_model.safetensors").exists():
        check_safetensors(export / "adapter_model.safetensors")
    elif not (export / "adapter_model.bin").exists():
        raise RunDirError(f"{export}: adapter weights are missing (adapter_model.safetensors)")
    if not cfg.get("base_model_name_or_path"):
        raise RunDirError(
            f"{export / 'adapter_config.json'}: no base_model_name_or_path; re-export merged "
            f"(without --adapter-only)"
        )


def _check_tokenizer(export: Path) -> None:
    if (export / "tokenizer.json").exists():
        _read_json(export / "tokenizer.json", "tokenizer")
    elif not (export / "tokenizer_config.json").exists():
        raise RunDirError(
            f"{export}: tokenizer files are missing (tokenizer.json / tokenizer_config.json)"
        )
    if (export / "tokenizer_config.json").exists():
        _read_json(export / "tokenizer_config.json", "tokenizer config")
