"""Config-time validation: fail at startup, with a message that says what to change."""

from __future__ import annotations

import importlib
import importlib.util
import re
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    pass


# Numeric knobs and their type: "int", "float" (an int is fine), "?" suffix = null allowed.
# Keys that are absent from the composed config are not checked (e.g. algo keys of other
# methods); a key that is present must have the type.
NUMERIC_KEYS: dict[str, str] = {
    "seed": "int?",
    "prompt.max_prompt_tokens": "int",
    "optim.lr": "float",
    "optim.weight_decay": "float",
    "optim.eps": "float",
    "optim.grad_clip": "float?",
    "rollout.num_generations": "int",
    "rollout.temperature": "float",
    "rollout.anchor_temperature": "float",
    "rollout.max_new_tokens": "int",
    "rollout.top_p": "float",
    "rollout.top_k": "int",
    "reward.tau": "float",
    "reward.lambda_consistency": "float",
    "reward.lambda_hard": "float",
    "reward.truncation_value": "float",
    "algo.epsilon_low": "float",
    "algo.epsilon_high": "float",
    "algo.dual_clip": "float?",
    "algo.num_iterations": "int",
    "algo.prompts_per_minibatch": "int",
    "algo.beta": "float",
    "algo.micro_batch_size": "int?",
    "algo.max_tokens_per_micro_batch": "int?",
    "algo.contrastive_weight": "float",
    "algo.contrastive_tau": "float",
    "reward.overlong_buffer": "int?",
    "reward.overlong_penalty_factor": "float",
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
    "rollout.ignore_eos",
    "algo.share_prompt",
    "algo.dynamic_sampling",
    "algo.contrastive_in_batch",
    "optim.master_weights_fp32",
    "model.gradient_checkpointing",
    "trainer.enable_progress_bar",
    "trainer.deterministic",
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


def experiment_choice(cfg: DictConfig) -> str | None:
    """The ``experiment=`` option the config was composed with (None when unknown, e.g. a config
    built by hand): from the composed ``hydra`` node, else from the running Hydra app."""
    choice = OmegaConf.select(cfg, "hydra.runtime.choices.experiment", default=None)
    if choice is None:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            choice = HydraConfig.get().runtime.choices.get("experiment")
    return choice


# The quickstart presets are GRACE recipes whose keys are applied after every group (an
# experiment comes last in conf/train.yaml's defaults), so they would silently replace a
# contrastive method's learning rate or run the unsupervised reward with supervised settings.
QUICKSTART_FOR = {"quickstart": "sup", "quickstart_unsup": "unsup"}


def check_preset(cfg: DictConfig, experiment: str | None) -> None:
    """``python train.py method=infonce`` or ``reward=unsup`` on top of the default quickstart
    preset: fail with the command that does what was meant."""
    if experiment not in QUICKSTART_FOR:
        return
    target = str((cfg.get("model") or {}).get("_target_", ""))
    if target.endswith("ContrastiveModule"):
        objective = cfg.model.get("objective", "infonce")
        default = " (what `python train.py` runs)" if experiment == "quickstart" else ""
        raise ConfigError(
            f"experiment={experiment}{default} is a GRACE recipe: its "
            f"optim.lr and rollout settings would replace method={objective}'s own. Add "
            f"experiment=none for the method's recipe on the embedded model (`python train.py "
            f"experiment=none method={objective}`) or experiment=paper_{objective} at paper scale."
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


def validate(cfg: DictConfig) -> None:
    check_types(cfg)
    check_preset(cfg, experiment_choice(cfg))
    check_push_to_hub(cfg)
    r, a, rw, d = cfg.rollout, cfg.algo, cfg.reward, cfg.data
    k = r.num_generations
    if rw.mode not in ("sup", "unsup"):
        raise ConfigError(f"reward.mode={rw.mode!r}: use reward=sup or reward=unsup")
    if k < 2 and a.advantage in ("grpo", "rloo"):
        raise ConfigError(
            f"rollout.num_generations={k}: group advantages need K >= 2 rollouts per prompt "
            f"(upstream 8); set rollout.num_generations>=2 or algo.advantage=reinforce_pp"
        )
    if d.prompts_per_step < 1 or a.prompts_per_minibatch < 1:
        raise ConfigError("data.prompts_per_step and algo.prompts_per_minibatch must be >= 1")
    if d.prompts_per_step % a.prompts_per_minibatch:
        raise ConfigError(
            f"data.prompts_per_step={d.prompts_per_step} is not a multiple of "
            f"algo.prompts_per_minibatch={a.prompts_per_minibatch}: every optimiser step must see "
            f"whole groups. Set algo.prompts_per_minibatch to a divisor of {d.prompts_per_step} "
            f"(upstream: 64 prompts per rollout batch, 16 per mini-batch)."
        )
    for name in ("temperature", "anchor_temperature"):
        if r[name] <= 0:
            raise ConfigError(f"rollout.{name}={r[name]}: temperatures must be > 0")
    if r.max_new_tokens < 1:
        raise ConfigError("rollout.max_new_tokens must be >= 1")
    if rw.tau <= 0:
        raise ConfigError(f"reward.tau={rw.tau}: the reward temperature must be > 0 (upstream 0.1)")
    if a.get("advantage", "grpo") not in ("grpo", "rloo", "reinforce_pp", "remax"):
        raise ConfigError(f"algo.advantage={a.advantage!r}: use grpo, rloo, reinforce_pp or remax")
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
            update.validate_update_config(cfg)
