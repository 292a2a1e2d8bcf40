"""Advantage estimators over (B, K) rewards: B groups (prompts) x K rollouts (pure tensor code).

NaN rewards mark rollouts that must not count (see `rewards.apply_truncation(mode="mask")`):
they are left out of every mean/std and get advantage 0.

- `group_advantages`: GRPO (Shao et al. 2024) / Dr.GRPO (Liu et al. 2025), as TRL
  `scale_rewards` and verl `norm_adv_by_std_in_grpo`. GRACE uses scale="none" (paper §3.5).
- `rloo_advantages`: RLOO (Ahmadian et al. 2024), leave-one-out baseline.
- `reinforce_pp_advantages`: REINFORCE++ (Hu 2025), batch whitening over response TOKENS as
  verl (no groups).
- `remax_advantages`: ReMax (Li et al. 2023), a greedy rollout's reward as baseline.

Every function runs in (at least) float32 with autocast off (`precision.full_precision`).

Each estimator is a Hydra `_target_` (``algo.advantage: {_target_: ...}`` in conf/algo/*.yaml),
registered exactly as a user's own estimator is (docs/extending.md): the module calls it with the
(B, K) rewards of the global batch and, by keyword, whichever of ``token_counts``, ``baseline``,
``scale`` and ``step`` its signature names (`grace_lightning.rl.targets`). What an estimator needs
from the run it declares with `estimator`: ``min_generations`` (K checked at startup) and
``needs_greedy_baseline`` (ReMax: one extra greedy rollout per prompt, its reward as ``baseline``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeVar

import torch
from torch import Tensor

from grace_lightning.rl.precision import f32, full_precision
from grace_lightning.rl.rewards import group_std

F = TypeVar("F", bound=Callable)

# ``algo.advantage=<name>``: the short spellings of the built-in estimators, kept for existing
# commands and configs (conf/algo/*.yaml name the ``_target_`` itself). A new estimator needs no
# entry here: ``algo.advantage._target_=<module>.<function>`` (docs/extending.md).
SHORT_NAMES = {
    "grpo": "grace_lightning.rl.advantages.group_advantages",
    "rloo": "grace_lightning.rl.advantages.rloo_advantages",
    "reinforce_pp": "grace_lightning.rl.advantages.reinforce_pp_advantages",
    "remax": "grace_lightning.rl.advantages.remax_advantages",
}


def estimator(*, min_generations: int = 1, needs_greedy_baseline: bool = False) -> Callable[[F], F]:
    """Declare what an advantage estimator needs from the run (read at startup, not by name).

    min_generations: the smallest ``rollout.num_generations`` (K) it gives a signal for (group
        baselines: 2); a smaller K stops the run at config time.
    needs_greedy_baseline: the rollout adds one greedy (temperature 0) rollout per policy
        prompt, scored by the same reward terms, and passes its (B,) reward as ``baseline`` (ReMax).
    """

    def mark(fn: F) -> F:
        fn.min_generations = int(min_generations)  # type: ignore[attr-defined]
        fn.needs_greedy_baseline = bool(needs_greedy_baseline)  # type: ignore[attr-defined]
        return fn

    return mark


def _nanmean(x: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Mean over finite entries; 0 where there are none (instead of NaN)."""
    return torch.nanmean(x, dim=dim, keepdim=keepdim).nan_to_num(0.0)


@estimator(min_generations=2)
@full_precision
def group_advantages(
    rewards: Tensor, scale: Literal["none", "group", "batch"] = "none", eps: float = 1e-4
) -> Tensor:
    """rewards (B, K) -> (B, K): reward minus its group's nan-mean, optionally / (std + eps).

    scale: "none" (paper, upstream `norm_adv_by_std_in_grpo=False`, TRL `scale_rewards="none"`),
    "group" (std per group) or "batch" (one std over all finite rewards), both unbiased as TRL.
    """
    if scale not in ("none", "group", "batch"):
        raise ValueError(f"scale must be 'none', 'group' or 'batch', got {scale!r}")
    rewards = f32(rewards)
    adv = rewards - _nanmean(rewards, dim=1, keepdim=True)  # (B, K)
    if scale == "group":
        adv = adv / (group_std(rewards)[:, None] + eps)
    elif scale == "batch":
        adv = adv / (group_std(rewards.reshape(1, -1)) + eps)
    return adv.nan_to_num(0.0)


@estimator(min_generations=2)
@full_precision
def rloo_advantages(rewards: Tensor) -> Tensor:
    """rewards (B, K) -> (B, K): r_ik - mean_{j != k} r_ij  (= K/(K-1) (r_ik - mean_j r_ij)).

    Over the n finite rewards of a group; 0 where n < 2.
    """
    rewards = f32(rewards)
    valid = ~torch.isnan(rewards)  # (B, K)
    n = valid.sum(1, keepdim=True)  # (B, 1)
    total = rewards.nansum(1, keepdim=True)  # (B, 1)
    baseline = (total - rewards) / (n - 1).clamp(min=1)  # (B, K)
    adv = torch.where(valid & (n >= 2), rewards - baseline, torch.zeros_like(rewards))
    return adv


@estimator()
@full_precision
def reinforce_pp_advantages(
    rewards: Tensor, token_counts: Tensor | None = None, eps: float = 1e-8
) -> Tensor:
    """rewards (N,) or (B, K) -> same shape: REINFORCE++ whitened over the batch's tokens (verl).

    verl `compute_reinforce_plus_plus_outcome_advantage` puts the sequence reward on the last
    response token, accumulates the return backwards (gamma) and whitens the per-token returns
    over all response tokens: `masked_whiten(returns, response_mask)`, i.e.
    (G_t - mean) * rsqrt(var + 1e-8) with the token mean and unbiased (n / (n - 1)) token
    variance. With gamma = 1 and no KL in the reward (this project: `algo.beta` is a loss term,
    verl `use_kl_in_loss`) the return is the sequence reward at every token of the sequence, so
    the whitening statistics are token-count-weighted ones over sequences, and verl's per-token
    advantage equals this function's per-sequence value at every token:

        n = sum_i L_i,  mean = sum_i L_i r_i / n,  var = sum_i L_i (r_i - mean)^2 / (n - 1)
        A_i = (r_i - mean) / sqrt(var + eps)

    Args:
        rewards: (N,) or (B, K); NaN = left out (advantage 0, no weight).
        token_counts: same shape: tokens of each response that enter the loss (response-mask
            sum times the truncation loss weight). None weighs every sequence 1 (whitening over
            sequences; verl's numbers only when all responses have equal length).
        eps: added to the variance (verl 1e-8).
    """
    r = f32(rewards).reshape(-1)  # (N,)
    w = r.new_ones(r.shape) if token_counts is None else f32(token_counts).reshape(-1)  # (N,)
    if w.shape != r.shape:
        raise ValueError(
            f"token_counts shape {tuple(token_counts.shape)} != {tuple(rewards.shape)}"
        )
    valid = ~torch.isnan(r) & (w > 0)  # (N,)
    w = torch.where(valid, w, torch.zeros_like(w))
    r0 = torch.where(valid, r, torch.zeros_like(r))
    n = w.sum()
    mean = (w * r0).sum() / n.clamp(min=1e-8)
    var = (w * (r0 - mean) ** 2).sum() / (n - 1).clamp(min=1e-8)  # unbiased over tokens
    adv = (r0 - mean) * torch.rsqrt(var + eps)
    adv = torch.where(valid & (n > 1), adv, torch.zeros_like(adv))
    return adv.reshape(rewards.shape)


@estimator(needs_greedy_baseline=True)
@full_precision
def remax_advantages(rewards: Tensor, baseline: Tensor) -> Tensor:
    """rewards (B, K), baseline (B,) reward of a greedy rollout per prompt -> (B, K)."""
    return (f32(rewards) - f32(baseline)[:, None]).nan_to_num(0.0)


@full_precision
def zero_std_groups(rewards: Tensor, atol: float = 1e-6) -> Tensor:
    """rewards (B, K) -> bool (B,): groups whose rewards are all equal (no learning signal).

    DAPO dynamic sampling drops these; TRL logs `frac_reward_zero_std` = their mean.
    Groups with fewer than two finite rewards count as zero-std.
    """
    return group_std(rewards) <= atol
