"""Advantage estimators over (B, K) rewards: B groups (prompts) x K rollouts (pure tensor code).

NaN rewards mark rollouts that must not count (see `rewards.apply_truncation(mode="mask")`):
they are left out of every mean/std and get advantage 0.

- `group_advantages`: GRPO (Shao et al. 2024) / Dr.GRPO (Liu et al. 2025), as TRL
  `scale_rewards` and verl `norm_adv_by_std_in_grpo`. GRACE uses scale="none" (paper §3.5).
- `rloo_advantages`: RLOO (Ahmadian et al. 2024), leave-one-out baseline.
- `reinforce_pp_advantages`: REINFORCE++ (Hu 2025), global batch normalisation, no groups.
- `remax_advantages`: ReMax (Li et al. 2023), a greedy rollout's reward as baseline.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from grace_lightning.rl.rewards import group_std


def _nanmean(x: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Mean over finite entries; 0 where there are none (instead of NaN)."""
    return torch.nanmean(x, dim=dim, keepdim=keepdim).nan_to_num(0.0)


def group_advantages(
    rewards: Tensor, scale: Literal["none", "group", "batch"] = "none", eps: float = 1e-4
) -> Tensor:
    """rewards (B, K) -> (B, K): reward minus its group's nan-mean, optionally / (std + eps).

    scale: "none" (paper, upstream `norm_adv_by_std_in_grpo=False`, TRL `scale_rewards="none"`),
    "group" (std per group) or "batch" (one std over all finite rewards), both unbiased as TRL.
    """
    if scale not in ("none", "group", "batch"):
        raise ValueError(f"scale must be 'none', 'group' or 'batch', got {scale!r}")
    adv = rewards - _nanmean(rewards, dim=1, keepdim=True)  # (B, K)
    if scale == "group":
        adv = adv / (group_std(rewards)[:, None] + eps)
    elif scale == "batch":
        adv = adv / (group_std(rewards.reshape(1, -1)) + eps)
    return adv.nan_to_num(0.0)


def rloo_advantages(rewards: Tensor) -> Tensor:
    """rewards (B, K) -> (B, K): r_ik - mean_{j != k} r_ij  (= K/(K-1) (r_ik - mean_j r_ij)).

    Over the n finite rewards of a group; 0 where n < 2.
    """
    valid = ~torch.isnan(rewards)  # (B, K)
    n = valid.sum(1, keepdim=True)  # (B, 1)
    total = rewards.nansum(1, keepdim=True)  # (B, 1)
    baseline = (total - rewards) / (n - 1).clamp(min=1)  # (B, K)
    adv = torch.where(valid & (n >= 2), rewards - baseline, torch.zeros_like(rewards))
    return adv


def reinforce_pp_advantages(rewards: Tensor, eps: float = 1e-4) -> Tensor:
    """rewards (N,) or (B, K) -> same shape: (r - mean) / (std + eps) over the whole batch.

    REINFORCE++ ignores groups; mean and (unbiased) std are over all finite rewards.
    """
    flat = rewards.reshape(1, -1)  # (1, N)
    adv = (flat - _nanmean(flat)) / (group_std(flat) + eps)
    return adv.reshape(rewards.shape).nan_to_num(0.0)


def remax_advantages(rewards: Tensor, baseline: Tensor) -> Tensor:
    """rewards (B, K), baseline (B,) reward of a greedy rollout per prompt -> (B, K)."""
    return (rewards - baseline[:, None]).nan_to_num(0.0)


def zero_std_groups(rewards: Tensor, atol: float = 1e-6) -> Tensor:
    """rewards (B, K) -> bool (B,): groups whose rewards are all equal (no learning signal).

    DAPO dynamic sampling drops these; TRL logs `frac_reward_zero_std` = their mean.
    Groups with fewer than two finite rewards count as zero-std.
    """
    return group_std(rewards) <= atol
