"""Token-level policy-gradient losses (pure tensor code): log-probs, entropy, PPO-clip, KL.

The surrogate and its aggregation follow TRL `GRPOTrainer._compute_loss` (`loss_type`) and
verl `core_algos.compute_policy_loss` (dual clip, Ye et al. 2020). Upstream GRACE trains with
verl's PPO-clip: clip 0.2, dual-clip c=3, token-mean aggregation (paper notes §3.5).

`masked_mean`, `kl_k3` and `clipped_policy_loss` run in (at least) float32 with autocast off
(`precision.full_precision`); every normaliser is guarded, so an all-masked batch gives loss 0
with zero gradient, never NaN.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from grace_lightning.rl.precision import f32, full_precision


def _rows(logits: Tensor, chunk_rows: int) -> list[Tensor]:
    return list(logits.reshape(-1, logits.shape[-1]).split(chunk_rows))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def selective_log_softmax(logits: Tensor, ids: Tensor, *, chunk_rows: int = 1024) -> Tensor:
    """logits (..., V), ids (...) -> (...) log p(ids), differentiable.

    logit[id] - logsumexp(logits), computed over chunks of rows so no full (..., V) log-softmax
    is materialised (as TRL `selective_log_softmax`). Half-precision logits are upcast chunk by
    chunk; the result is at least float32. Under autograd the upcast chunks are kept for the
    backward pass, so pass float32 logits (or call under no_grad for old/ref log-probs) when
    memory matters.
    """
    acc = _acc_dtype(logits.dtype)
    out = []
    for chunk, chunk_ids in zip(_rows(logits, chunk_rows), ids.reshape(-1).split(chunk_rows)):
        chunk = chunk.to(acc)  # (R, V)
        picked = chunk.gather(-1, chunk_ids[:, None]).squeeze(-1)  # (R,)
        out.append(picked - torch.logsumexp(chunk, dim=-1))
    return torch.cat(out).reshape(ids.shape)


def entropy_from_logits(logits: Tensor, *, chunk_rows: int = 1024) -> Tensor:
    """logits (..., V) -> (...) entropy -sum_v p log p, over chunks of rows (as TRL)."""
    acc = _acc_dtype(logits.dtype)
    out = []
    for chunk in _rows(logits, chunk_rows):
        logp = torch.log_softmax(chunk.to(acc), dim=-1)  # (R, V)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out).reshape(logits.shape[:-1])


@full_precision
def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over entries where mask (float weights or bool) is non-zero; 0 if none."""
    x, mask = f32(x), f32(mask)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1e-8)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1e-8)


@full_precision
def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """(N, T) k3 estimator of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1 >= 0.

    Schulman's "approximating KL" k3, as TRL (`beta * per_token_kl`) and verl `low_var_kl`.
    """
    d = f32(ref_logp) - f32(logp)
    return torch.exp(d) - d - 1


@full_precision
def clipped_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    dual_clip: float | None = 3.0,
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo",
    max_completion_length: int | None = None,
    num_items: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip surrogate per token, aggregated as TRL `loss_type`.

    Args:
        logp, old_logp: (N, T) log-probs of the sampled tokens under the current / rollout policy.
        advantages: (N,) one advantage per sequence (or (N, T) per token).
        mask: (N, T) float completion mask (multiply truncation loss weights into it).
        epsilon_low, epsilon_high: clip range [1 - eps_low, 1 + eps_high] (DAPO clip-higher).
        dual_clip: c > 1; for A < 0 the loss is min(max(-A r, -A clip(r)), -A c) (verl).
            None disables it.
        loss_type: how per-token losses L_nt are reduced:
            "grpo":    mean_n (sum_t L_nt m_nt / sum_t m_nt)
            "bnpo":    sum L m / (active tokens in this batch)
            "dr_grpo": sum L m / (N * max_completion_length)  (default length: T)
            "dapo":    sum L m / num_items, num_items = active tokens in the GLOBAL batch
                       (default: this batch's). With DDP gradient averaging pass
                       global_tokens / world_size, as TRL does.
            Every normaliser is guarded: with no active token (mask all zero, num_items 0)
            the loss is 0 with zero gradient, not NaN. Masked entries of logp/old_logp must be
            finite (they are multiplied by 0).
        max_completion_length: for "dr_grpo".
        num_items: for "dapo" (float or 0-dim tensor, >= 0; 0 means no active token anywhere).

    Returns:
        loss (scalar), metrics with TRL names (fractions of active tokens, detached):
        `clip_ratio/low_mean` (r < 1-eps_low and A < 0), `clip_ratio/high_mean`
        (r > 1+eps_high and A > 0), `clip_ratio/region_mean` (either), and
        `clip_ratio/dual_clip_mean` (A < 0 and the dual clip bound is active).
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    logp, old_logp, advantages, mask = f32(logp), f32(old_logp), f32(advantages), f32(mask)
    adv = advantages[:, None] if advantages.dim() == 1 else advantages  # (N, 1) or (N, T)

    ratio = torch.exp(logp - old_logp)  # (N, T)
    loss1 = -adv * ratio
    loss2 = -adv * torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = torch.maximum(loss1, loss2)  # (N, T) pessimistic PPO bound
    is_dual = torch.zeros_like(per_token, dtype=torch.bool)
    if dual_clip is not None:
        loss3 = -adv * dual_clip
        is_dual = (adv < 0) & (per_token > loss3)
        per_token = torch.where(adv < 0, torch.minimum(per_token, loss3), per_token)

    summed = (per_token * mask).sum()
    if loss_type == "grpo":
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # (N,)
        loss = per_seq.sum() / max(per_seq.numel(), 1)
    elif loss_type == "bnpo":
        loss = summed / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        T = max_completion_length if max_completion_length is not None else logp.shape[-1]
        loss = summed / max(logp.shape[0] * T, 1)
    elif loss_type == "dapo":
        loss = _safe_divide(summed, mask.sum() if num_items is None else num_items)
    else:
        raise ValueError(f"loss_type must be grpo, bnpo, dr_grpo or dapo, got {loss_type!r}")

    with torch.no_grad():
        is_low = (ratio < 1 - epsilon_low) & (adv < 0)
        is_high = (ratio > 1 + epsilon_high) & (adv > 0)
        metrics = {
            "clip_ratio/low_mean": masked_mean(is_low.to(mask.dtype), mask),
            "clip_ratio/high_mean": masked_mean(is_high.to(mask.dtype), mask),
            "clip_ratio/region_mean": masked_mean((is_low | is_high).to(mask.dtype), mask),
            "clip_ratio/dual_clip_mean": masked_mean(is_dual.to(mask.dtype), mask),
        }
    return loss, metrics


def _safe_divide(total: Tensor, count: float | Tensor) -> Tensor:
    """total / count, or total * 0 (value 0, zero gradient) where count <= 0.

    count may be fractional (DDP: global tokens / world size), so it is not clamped to 1.
    """
    count = torch.as_tensor(count, dtype=total.dtype, device=total.device)
    return torch.where(count > 0, total / count.clamp(min=1e-8), total * 0.0)
