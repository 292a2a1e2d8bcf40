"""Typed config schema: Hydra structured configs for the groups this package's own code reads.

Each dataclass is registered in Hydra's ``ConfigStore`` as ``<group>/schema`` and every option
file of the group starts with ``defaults: [schema, _self_]`` (``[schema, grpo, _self_]`` for the
algorithms that extend ``algo/grpo.yaml``), so Hydra checks types and key names when it
composes (``optim.lr=abc`` -> "Value 'abc' of type 'str' could not be converted to Float,
full_key: optim.lr"; ``algo.epsilon=0.2`` -> "Key 'epsilon' not in 'AlgoConfig'"), before any
model loads. The code reads its config through the same dataclasses (:func:`typed`), so no
default is repeated as a ``.get("key", default)``. The YAML files keep the documented values
(what each knob means and where it comes from); ``tests/test_config.py`` checks that the
dataclass defaults equal those of each group's default option (``conf/train.yaml``) and that
every key an option sets is a field.

``algo.advantage`` and ``reward.terms`` hold Hydra ``_target_`` nodes that
``grace_lightning/rl/targets.py`` resolves and checks (their keys are the called function's
arguments, not a schema's), so they are ``Any``.

Groups built straight from config into library objects (``trainer``, ``callbacks``, ``logger``,
``peft`` -> ``peft.LoraConfig``, ``data`` -> ``GraceDataModule``) are typed by those objects'
own signatures; ``config.check_types`` checks their numeric knobs at startup, and those of the
top-level ``prompt`` node (a key of ``conf/train.yaml``, not a group).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

# `X | None` = null allowed (OmegaConf 2.3 reads these annotations at runtime as Optional[X]).


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
class PromptConfig:
    """``prompt`` (a node of conf/train.yaml, shared by every method): the policy's chat prompt."""

    system_prompt: str | None = None  # conf/train.yaml holds the paper's; None: no system turn
    max_prompt_tokens: int = 1024  # paper/upstream: policy prompts <= 1024 tokens


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


def _grpo_advantage() -> dict[str, Any]:
    return {"_target_": "grace_lightning.rl.advantages.group_advantages"}


@dataclass
class AlgoConfig:
    """Advantage and policy update (``conf/algo/grpo.yaml``, the default; the other options
    extend it)."""

    advantage: Any = field(default_factory=_grpo_advantage)  # a _target_ node (rl/targets.py)
    scale_rewards: str = "none"
    loss_type: str = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    dual_clip: float | None = 3.0
    num_iterations: int = 1
    prompts_per_minibatch: int = 2
    micro_batch_size: int | None = None
    max_tokens_per_micro_batch: int | None = None
    beta: float = 0.0
    old_logprobs: str = "rollout"
    share_prompt: bool = True
    dynamic_sampling: bool = False
    contrastive_weight: float = 0.0
    contrastive_tau: float = 0.05
    contrastive_in_batch: bool = True
    pg_weight: float = 1.0
    log_term_grad_norms_steps: int = 8


@dataclass
class RewardConfig:
    """The GRACE reward (``conf/reward/sup.yaml``, the default; ``unsup.yaml``)."""

    mode: str = "sup"
    objective: str = "grace"
    tau: float = 0.1
    lambda_consistency: float = 0.2
    lambda_hard: float = 0.2
    negative_mode: str = "paper"  # reward=sup's neg term
    hard_mode: str = "paper"  # reward=sup's hard term
    cross_group: str = "paper"  # reward=unsup's hard term
    # {<name>: {_target_: ..., weight: w, ...}} (rl/targets.py). None: the paper's terms for
    # ``mode`` (rl/rewards.paper_terms, what reward/sup.yaml and unsup.yaml list). Not a dict
    # default: Hydra merges an option's mapping INTO the schema's, so sup's terms would stay in
    # reward=unsup.
    terms: Any = None
    truncation: str = "replace"
    truncation_value: float = -1.0
    overlong_buffer: int | None = None
    overlong_penalty_factor: float = 1.0


SCHEMAS: dict[str, type] = {
    "optim": OptimConfig,
    "rollout": RolloutConfig,
    "algo": AlgoConfig,
    "reward": RewardConfig,
}


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
