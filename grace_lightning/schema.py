"""Typed config schema: Hydra structured configs for the groups this package's own code reads.

Each dataclass is registered in Hydra's ``ConfigStore`` as ``<group>/schema`` and every option
file of the group starts with ``defaults: [schema, _self_]``, so Hydra checks types and key names
when it composes (``optim.lr=abc`` -> "Value 'abc' of type 'str' could not be converted to Float,
full_key: optim.lr"; ``algo.epsilon=0.2`` -> "Key 'epsilon' not in 'AlgoConfig'"), before any
model loads. The code reads its config through the same dataclasses (:func:`typed`), so no default is repeated as a
``.get("key", default)``. The YAML files keep the documented values (what each knob means and
where it comes from); ``tests/test_schema.py`` checks that the dataclass defaults equal them.

Groups built straight from config into library objects (``trainer``, ``callbacks``, ``logger``,
``peft`` -> ``peft.LoraConfig``, ``data`` -> ``GraceDataModule``) are typed by those objects'
own signatures; ``config.check_types`` checks their numeric knobs at startup.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Optional[...] rather than `X | None`: OmegaConf 2.3 reads the annotations at runtime and
# knows typing's Optional, not PEP 604 unions.


@dataclass
class OptimConfig:
    """AdamW (``conf/optim/adamw.yaml``)."""

    lr: float = 1.0e-6
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8
    grad_clip: float | None = 1.0
    master_weights_fp32: bool = True


@dataclass
class VllmConfig:
    """``rollout.engine=vllm`` (``conf/rollout/default.yaml``, docs/vllm.md)."""

    dtype: str = "bfloat16"
    gpu_memory_utilization: float = 0.3
    kv_cache_gb: int = 2
    max_model_len: int | None = None
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    sleep: bool = True
    tis_cap: float | None = None
    score_rows: int | None = None


@dataclass
class RolloutConfig:
    """Sampling rationales (``conf/rollout/default.yaml``)."""

    engine: str = "hf"
    num_generations: int = 4
    temperature: float = 1.0
    anchor_temperature: float = 0.5
    max_new_tokens: int = 64
    top_p: float = 1.0
    top_k: int = 0
    ignore_eos: bool = False
    max_rows_per_batch: int | None = None
    max_kv_tokens: int | None = None
    share_prompt_kv: bool = True
    share_prefix: bool = True
    progress_every: int = 16
    vllm: VllmConfig = field(default_factory=VllmConfig)


SCHEMAS: dict[str, type] = {"optim": OptimConfig, "rollout": RolloutConfig}


def register() -> None:
    """Store every schema as ``<group>/schema`` (idempotent; called on ``import grace_lightning``
    so that ``train.py``, ``compose()`` in tests and notebooks all see it)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for group, node in SCHEMAS.items():
        cs.store(group=group, name="schema", node=node)


def typed(cls: type, cfg: Any) -> DictConfig:
    """``cfg`` (a DictConfig, a dict, a partial dict from Python, or None) checked against the
    schema ``cls``: missing keys take the schema's defaults; a wrong type or an unknown key raises
    with the key's name. Returns a struct DictConfig typed by ``cls`` (``cfg.top_k`` or
    ``cfg["top_k"]``; assignments are type-checked too)."""
    base = OmegaConf.structured(cls)
    if cfg is not None:
        plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
        base = OmegaConf.merge(base, plain)
    return base
