"""Config-time validation: fail at startup, with a message that says what to change."""

from __future__ import annotations

from omegaconf import DictConfig


class ConfigError(ValueError):
    pass


def validate(cfg: DictConfig) -> None:
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
    if rw.get("truncation", "replace") not in ("replace", "mask", "off"):
        raise ConfigError(f"reward.truncation={rw.truncation!r}: use replace, mask or off")
    if cfg.prompt.max_prompt_tokens < 8:
        raise ConfigError("prompt.max_prompt_tokens is too small to hold the chat template")
    model = cfg.get("model") or {}
    if str(model.get("_target_", "")).endswith("ContrastiveModule"):  # method=infonce|simcse
        from grace_lightning.contrastive import check_args

        check_args(model.objective, model.get("data_mode"), model.tau, model.lr_schedule)
