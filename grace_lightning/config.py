"""Config-time validation: fail at startup, with a message that says what to change."""

from __future__ import annotations

import importlib
import importlib.util
import re
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from grace_lightning.errors import ConfigError  # noqa: F401  (re-exported: the name callers know)
from grace_lightning.presets import experiment_choice
from grace_lightning.schema import PromptConfig, RolloutConfig, typed

# Numeric knobs and their type: "int", "float" (an int is fine), "?" suffix = null allowed.
# Keys that are absent from the composed config are not checked (e.g. model keys of other
# methods); a key that is present must have the type. The groups with a typed schema
# (grace_lightning/schema.py: optim, rollout, algo, reward) are checked by Hydra when it
# composes, with the key's full name ("full_key: algo.epsilon_low"): they need no entry here.
NUMERIC_KEYS: dict[str, str] = {
    "seed": "int?",
    "prompt.max_prompt_tokens": "int",  # prompt: a node of conf/train.yaml (schema.PromptConfig)
    "data.prompts_per_step": "int",
    "data.max_examples": "int?",
    "data.val_fraction": "float",
    "data.max_prompt_tokens": "int?",
    "data.num_workers": "int",
    "peft.r": "int",
    "peft.lora_alpha": "float",
    "peft.lora_dropout": "float",
    "trainer.max_steps": "int",
    "trainer.max_epochs": "int?",
    "trainer.num_nodes": "int",
    "trainer.log_every_n_steps": "int",
    "trainer.limit_val_batches": "float",
    "callbacks.model_checkpoint.every_n_rollout_batches": "int?",
    "callbacks.model_checkpoint.every_n_minutes": "float?",
    "callbacks.model_checkpoint.every_n_epochs": "int?",
    "callbacks.model_checkpoint.save_top_k": "int",
    "model.tau": "float",
    "model.warmup_steps": "int",
    "model.max_text_tokens": "int?",
}
BOOL_KEYS = (
    "model.gradient_checkpointing",
    "trainer.enable_progress_bar",
    "trainer.strategy.activation_checkpointing",
    "trainer.deterministic",
    "allow_cpu",
    "memory_check",
)


def _select(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    """(present, value) without resolving anything but the key itself."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_types(cfg: DictConfig) -> None:
    """Numeric and boolean knobs have their type; the message names the key (``optim.lr:
    expected a number, got 'abc'``). Runs before any other check and before any model loads."""
    for key, kind in NUMERIC_KEYS.items():
        present, value = _select(cfg, key)
        if not present or (value is None and kind.endswith("?")):
            continue
        want_int = kind.startswith("int")
        ok = isinstance(value, int) if want_int else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok:
            what = "an integer" if want_int else "a number"
            null = " (or null)" if kind.endswith("?") else ""
            raise ConfigError(f"{key}: expected {what}{null}, got {value!r}")
    for key in BOOL_KEYS:
        present, value = _select(cfg, key)
        if present and value is not None and not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
    present, betas = _select(cfg, "optim.betas")
    if present and not (
        isinstance(betas, (list, ListConfig))
        and len(betas) == 2
        and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas)
    ):
        shown = OmegaConf.to_container(betas) if isinstance(betas, ListConfig) else betas
        raise ConfigError(f"optim.betas: expected two numbers like [0.9, 0.999], got {shown!r}")
    if "prompt" in cfg:  # not a Hydra group: its schema (PromptConfig) is applied here
        try:
            typed(PromptConfig, cfg.prompt)
        except OmegaConfBaseException as e:
            key = f"prompt.{e.full_key}" if getattr(e, "full_key", None) else "prompt"
            raise ConfigError(
                f"{key}: {str(e).splitlines()[0]} (prompt takes system_prompt, max_prompt_tokens)"
            ) from None


# The quickstart presets are GRACE recipes whose keys are applied after every group (an
# experiment comes last in conf/train.yaml's defaults), so they would silently replace a
# contrastive method's learning rate or run the unsupervised reward with supervised settings.
QUICKSTART_FOR = {"quickstart": "sup", "quickstart_unsup": "unsup"}
# The contrastive quickstarts are one method's recipe (its lr, batch and budget): another method
# chosen over them would train with settings tuned for something else.
CONTRASTIVE_QUICKSTART_FOR = {"quickstart_infonce": "infonce", "quickstart_simcse": "simcse"}


def check_preset(cfg: DictConfig, experiment: str | None) -> None:
    """``method=infonce`` or ``reward=unsup`` on top of a quickstart preset: fail with the command
    that does what was meant. ``experiment=auto`` composed without train.py (which resolves it,
    grace_lightning/presets.py) is the quickstart: a paper backbone there is refused too."""
    if experiment == "auto":
        from grace_lightning.presets import preset_for

        method = str(OmegaConf.select(cfg, "model.objective", default=None) or "grace")
        meant = preset_for(str(cfg.backbone.name), str(cfg.reward.mode), method)
        if meant != "quickstart":
            raise ConfigError(
                f"experiment=auto was composed without train.py, so it is the quickstart; "
                f"backbone={cfg.backbone.name} reward={cfg.reward.mode} method={method} means "
                f"experiment={meant}: add it to the overrides (or pass them through "
                f"grace_lightning.presets.resolve_overrides)"
            )
        experiment = "quickstart"
    target = str((cfg.get("model") or {}).get("_target_", ""))
    contrastive = target.endswith("ContrastiveModule")
    objective = str(cfg.model.get("objective", "infonce")) if contrastive else "grace"
    if experiment in CONTRASTIVE_QUICKSTART_FOR:
        meant = CONTRASTIVE_QUICKSTART_FOR[experiment]
        if objective != meant:
            raise ConfigError(
                f"experiment={experiment} is method={meant}'s recipe (its optim.lr, batch and "
                f"budget); method={objective} over it would train with them. Run `python train.py "
                f"method={objective}` (the preset that fits it) or name no preset: experiment=none."
            )
        return
    if experiment not in QUICKSTART_FOR:
        return
    if contrastive:
        default = " (what `python train.py` runs)" if experiment == "quickstart" else ""
        raise ConfigError(
            f"experiment={experiment}{default} is a GRACE recipe: its "
            f"optim.lr and rollout settings would replace method={objective}'s own. Run "
            f"`python train.py method={objective}` for the method's quickstart on the embedded "
            f"model (experiment=quickstart_{objective}), experiment=none for its recipe as it is, "
            f"or experiment=paper_{objective} at paper scale."
        )
    mode, meant = cfg.reward.mode, QUICKSTART_FOR[experiment]
    if mode != meant:
        other = next(e for e, m in QUICKSTART_FOR.items() if m == mode)
        raise ConfigError(
            f"reward={mode} with experiment={experiment}: that preset is tuned for reward={meant}. "
            f"Use experiment={other} (the study's best reward={mode} recipe) or experiment=none "
            f"reward={mode} (the paper's settings)."
        )


def check_push_to_hub(cfg: DictConfig) -> None:
    """``callbacks.export.push_to_hub`` uploads when training ends: an offline machine or a
    malformed repo id must fail now, not after the whole run."""
    repo_id = OmegaConf.select(cfg, "callbacks.export.push_to_hub", default=None)
    if not repo_id:
        return
    from grace_lightning.eval.encoder import hub_offline

    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(repo_id)):
        raise ConfigError(
            f"callbacks.export.push_to_hub={repo_id!r}: expected a Hub repo id <owner>/<name>"
        )
    if hub_offline():
        raise ConfigError(
            f"callbacks.export.push_to_hub={repo_id}: HF_HUB_OFFLINE is set, so the upload at the "
            f"end of training would fail. Unset HF_HUB_OFFLINE (and `hf auth login`), or drop the "
            f"key and upload the export later: python -m grace_lightning.export <run dir> "
            f"--push-to-hub {repo_id}"
        )


def check_rollout_engine(cfg: DictConfig) -> None:
    """rollout.engine is hf or vllm; vllm's knobs are in range and vLLM is importable."""
    r = typed(RolloutConfig, cfg.rollout)  # absent keys: the schema's defaults
    engine = r.engine
    if engine not in ("hf", "vllm"):
        raise ConfigError(
            f"rollout.engine={engine!r}: use hf (built-in sampler) or vllm (colocated vLLM, "
            f"pip install -e '.[vllm]' on GPUs, see docs/vllm.md for CPUs)"
        )
    if engine != "vllm":
        return
    v = r.vllm
    util = v.gpu_memory_utilization
    if not 0 < util <= 1:
        raise ConfigError(
            f"rollout.vllm.gpu_memory_utilization={util}: the fraction of GPU memory vLLM may "
            f"take (weights + KV cache), in (0, 1]; the trainer needs the rest (TRL colocate: 0.3)"
        )
    cap = v.tis_cap
    if cap is not None and cap < 1:
        raise ConfigError(
            f"rollout.vllm.tis_cap={cap}: the truncated importance-sampling cap must be >= 1 "
            f"(TRL/verl use 2), or null to turn the correction off"
        )
    if v.dtype not in ("bfloat16", "float16", "float32"):
        raise ConfigError(f"rollout.vllm.dtype={v.dtype!r}: use bfloat16, float16 or float32")
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "rollout.engine=vllm needs vLLM: pip install -e '.[vllm]' (GPU) or the CPU install "
            "in docs/vllm.md; or set rollout.engine=hf"
        )


def check_fsdp_activation_checkpointing(cfg: DictConfig) -> None:
    """FSDP's activation checkpointing re-runs each decoder layer's forward in backward; on the
    shared-prompt loss pass that forward appends the prompt's K/V to the cache a second time
    (a shape error in backward). The full-sequence pass (``algo.share_prompt=false``) has no
    cache."""
    strategy = OmegaConf.select(cfg, "trainer.strategy", default=None)
    if not isinstance(strategy, DictConfig) or not strategy.get("activation_checkpointing"):
        return
    if cfg.algo.share_prompt:
        raise ConfigError(
            "trainer.strategy.activation_checkpointing=true with algo.share_prompt=true: the "
            "recomputed layer forwards would append the shared prompt's K/V to the loss pass's "
            "cache again. Set algo.share_prompt=false (prompt + response in one pass, what "
            "gradient checkpointing needs) or trainer.strategy.activation_checkpointing=false."
        )


def check_global_batch(cfg: DictConfig) -> None:
    """``data.prompts_per_step`` and ``algo.prompts_per_minibatch`` are GLOBAL (verl's
    train_batch_size / ppo_mini_batch_size): each of the world's ranks takes 1/world of each, so
    both must divide by the world size (trainer.devices x trainer.num_nodes)."""
    from grace_lightning.presets import world_size

    world = world_size(cfg)
    if not world or world == 1:
        return
    t = cfg.trainer
    where = f"trainer.devices={t.devices} x trainer.num_nodes={t.get('num_nodes', 1)} = {world}"
    keys = ["data.prompts_per_step", "algo.prompts_per_minibatch"]
    if str(OmegaConf.select(cfg, "model._target_", default="")).endswith("ContrastiveModule"):
        keys.remove("algo.prompts_per_minibatch")  # infonce/simcse: no PPO mini-batches
    for key in keys:
        value = int(OmegaConf.select(cfg, key))
        if value % world:
            near = sorted({m for m in (value // world * world, (value // world + 1) * world) if m})
            raise ConfigError(
                f"{key}={value} is global (all ranks together) and {where} ranks must split it "
                f"evenly: set {key} to a multiple of {world} (e.g. "
                f"{' or '.join(map(str, near))}), or change the number of devices"
            )


# optional dependencies: module -> the pip extra that installs it (pyproject.toml)
EXTRAS = {"wandb": "wandb", "peft": "lora", "matplotlib": "study"}


def require_extra(module: str, option: str) -> None:
    """Stop with the install command when ``option`` needs ``module`` and it is not installed."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        extra = EXTRAS[module]
        raise ConfigError(
            f"{option} needs `{module}`, an optional dependency: "
            f"pip install 'grace-lightning[{extra}]' (or pip install {module})"
        )


def check_extras(cfg: DictConfig) -> None:
    """logger=wandb needs the ``wandb`` extra, peft=lora the ``lora`` extra."""
    loggers = cfg.get("logger") or {}
    targets = [str((c or {}).get("_target_", "")) for c in loggers.values()]
    if any("wandb" in t.lower() for t in targets):
        require_extra("wandb", "logger=wandb")
    if cfg.get("peft"):
        require_extra("peft", "peft=lora")


def validate(cfg: DictConfig) -> None:
    check_types(cfg)
    check_fsdp_activation_checkpointing(cfg)
    check_preset(cfg, experiment_choice(cfg))
    check_push_to_hub(cfg)
    check_extras(cfg)  # an option whose optional dependency is missing: the pip extra to install
    r, a, rw, d = cfg.rollout, cfg.algo, cfg.reward, cfg.data
    if rw.mode not in ("sup", "unsup"):
        raise ConfigError(f"reward.mode={rw.mode!r}: use reward=sup or reward=unsup")
    from grace_lightning.rl.targets import check_extensions

    # algo.advantage and reward.terms (Hydra _target_s): they import, take the inputs they are
    # given, and the estimator's min_generations holds for K (docs/extending.md)
    check_extensions(cfg)
    if d.prompts_per_step < 1 or a.prompts_per_minibatch < 1:
        raise ConfigError("data.prompts_per_step and algo.prompts_per_minibatch must be >= 1")
    if d.prompts_per_step % a.prompts_per_minibatch:
        raise ConfigError(
            f"data.prompts_per_step={d.prompts_per_step} is not a multiple of "
            f"algo.prompts_per_minibatch={a.prompts_per_minibatch}: every optimiser step must see "
            f"whole groups. Set algo.prompts_per_minibatch to a divisor of {d.prompts_per_step} "
            f"(upstream: 64 prompts per rollout batch, 16 per mini-batch)."
        )
    check_global_batch(cfg)
    for name in ("temperature", "anchor_temperature"):
        if r[name] <= 0:
            raise ConfigError(f"rollout.{name}={r[name]}: temperatures must be > 0")
    if r.max_new_tokens < 1:
        raise ConfigError("rollout.max_new_tokens must be >= 1")
    check_rollout_engine(cfg)
    if rw.tau <= 0:
        raise ConfigError(f"reward.tau={rw.tau}: the reward temperature must be > 0 (upstream 0.1)")
    if a.loss_type not in ("grpo", "bnpo", "dr_grpo", "dapo"):
        raise ConfigError(
            f"algo.loss_type={a.loss_type!r}: use grpo, bnpo, dr_grpo or dapo (TRL names)"
        )
    if a.scale_rewards not in ("none", "group", "batch"):
        raise ConfigError(f"algo.scale_rewards={a.scale_rewards!r}: use none, group or batch")
    from grace_lightning.rl.joint import validate_joint_config
    from grace_lightning.rl.rewards import validate_truncation_config

    validate_joint_config(a, ConfigError)
    validate_truncation_config(rw, r.max_new_tokens, ConfigError)
    if cfg.prompt.max_prompt_tokens < 8:
        raise ConfigError("prompt.max_prompt_tokens is too small to hold the chat template")
    model = cfg.get("model") or {}
    if str(model.get("_target_", "")).endswith("ContrastiveModule"):  # method=infonce|simcse
        from grace_lightning.contrastive import check_args

        check_args(model.objective, model.get("data_mode"), model.tau, model.lr_schedule)
    if importlib.util.find_spec("grace_lightning.rl.update") is not None:
        # the update loop's own checks (micro-batch sizes, token budgets), when it has them
        update = importlib.import_module("grace_lightning.rl.update")
        if hasattr(update, "validate_update_config"):
            from grace_lightning.presets import world_size

            update.validate_update_config(cfg, ConfigError, world=world_size(cfg))
