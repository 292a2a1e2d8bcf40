"""GRACE contrastive rewards from L2-normalised embeddings (pure tensor functions).

All inputs are unit vectors, so a dot product is the cosine similarity. Every function returns
per-rollout tensors of shape (B, K): B groups (prompts) with K rollouts each. The caller passes
the GLOBAL batch (gathered across ranks, as TRL gathers rewards before grouping), because the
cross-group ("hard") terms compare a group with every other group in the batch.

Paper (arXiv 2510.04506, notes §3.4):
    R_CL      = sim(q, d+_k) - sum_m sim(q, d-_m)
    R_consist = 1/(K-1) sum_{j!=k} sim(d+_k, d+_j)
    R_hard    = -1/(B-1) sum_{g!=i} max_l sim(q_i, d+_gl)
    R_total   = (R_CL + l1 R_consist + l2 R_hard) / tau
Upstream code (`GasolSun36/GRACE`, `HiddenRewardManager`): the same, with one negative, a -1
replacement reward for truncated responses, and a different unsupervised cross-group term.

Every public function runs in (at least) float32 with autocast off (`precision.full_precision`),
so `trainer.precision=bf16-mixed` cannot round the small within-group differences away.

The run's reward is a mapping of named terms (``reward.terms`` in conf/reward/*.yaml, TRL's
``reward_funcs`` + ``reward_weights``): each a Hydra ``_target_`` with a ``weight``, called with
the keyword inputs its signature names (`grace_lightning.rl.targets.TERM_INPUTS`) and returning a
(B, K) per-rollout value; ``total = sum_n weight_n * term_n / tau``. The paper's terms are the
``*_term`` functions below, registered in the YAML exactly as a user's own term is
(docs/extending.md); `supervised_rewards` / `unsupervised_rewards` are the same terms with the
paper's weights, kept as one call for tests and scripts.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from grace_lightning.rl.precision import f32 as _f32
from grace_lightning.rl.precision import full_precision
from grace_lightning.schema import RewardConfig

# ----------------------------------------------------------------------------- helpers


def _mean_over_other_groups(x: Tensor) -> Tensor:
    """x (B, ..., B) with the first and last dims indexing groups -> (B, ...) mean over g != i.

    Zero when B == 1 (there are no other groups).
    """
    B = x.shape[0]
    if B == 1:
        return x.new_zeros(x.shape[:-1])
    off_diag = ~torch.eye(B, dtype=torch.bool, device=x.device)  # (B, B)
    off_diag = off_diag.view(B, *([1] * (x.dim() - 2)), B)  # (B, 1.., B)
    return x.masked_fill(~off_diag, 0.0).sum(-1) / (B - 1)


def _consistency(x: Tensor) -> Tensor:
    """x (B, K, D) -> (B, K): mean_{j != k} cos(x_ik, x_ij); zero when K == 1 (paper R_consist)."""
    B, K, _ = x.shape
    if K == 1:
        return x.new_zeros(B, K)
    sim = x @ x.transpose(-1, -2)  # (B, K, K)
    return (sim.sum(-1) - sim.diagonal(dim1=-2, dim2=-1)) / (K - 1)


def _hard_anchor(anchor: Tensor, rollouts: Tensor) -> Tensor:
    """Paper R_hard: -mean_{g != i} max_l cos(anchor_i, x_gl). anchor (B, D), x (B, K, D) -> (B,)."""
    sim = torch.einsum("id,gld->igl", anchor, rollouts)  # (B, B, K)
    return -_mean_over_other_groups(sim.amax(-1))  # (B,)


@full_precision
def group_std(term: Tensor) -> Tensor:
    """term (B, K) -> (B,) UNBIASED (Bessel-corrected, as `torch.std` and TRL) std per group.

    NaN entries (masked rollouts, see `apply_truncation`) are ignored; a group with fewer than
    two finite values has std 0. Logged as `rewards/<term>/group_std`.
    """
    term = _f32(term)
    valid = ~torch.isnan(term)  # (B, K)
    n = valid.sum(-1)  # (B,)
    x = term.masked_fill(~valid, 0.0)
    mean = x.sum(-1) / n.clamp(min=1)  # (B,)
    sq = ((x - mean[:, None]) ** 2).masked_fill(~valid, 0.0).sum(-1)  # (B,)
    var = sq / (n - 1).clamp(min=1)
    return torch.where(n >= 2, var.sqrt(), torch.zeros_like(var))


# ----------------------------------------------------------------------------- reward terms
# One function per term, each (B, K) and unweighted: what ``reward.terms`` registers. Inputs by
# keyword (the names of `grace_lightning.rl.targets.TERM_INPUTS`): rollouts (B, K, D), anchor
# (B, D): the query (sup) or the self-anchor (unsup), negatives (B, M, D) or None.

NEGATIVE_MODES = ("paper", "per_rollout")
HARD_MODES = ("paper", "per_rollout", "upstream")


@full_precision
def similarity_term(rollouts: Tensor, anchor: Tensor) -> Tensor:
    """cos(anchor_i, x_ik) -> (B, K). Supervised: ``pos`` = cos(q, d+_k) (R_CL's positive part);
    unsupervised: ``self`` = cos(self-anchor, x_k) (R_self)."""
    return torch.einsum("bd,bkd->bk", _f32(anchor), _f32(rollouts))


@full_precision
def negative_term(
    rollouts: Tensor,
    anchor: Tensor,
    negatives: Tensor | None,
    mode: Literal["paper", "per_rollout"] = "paper",
) -> Tensor:
    """``neg`` -> (B, K); zero without negatives (unsupervised, or M = 0).

    mode "paper": -sum_m cos(q_i, d-_im), constant within a group, so it cancels under group-mean
    advantages (upstream issue #4). "per_rollout": -sum_m cos(d+_ik, d-_im), varies with k.
    All-zero negative vectors (padding) add cos 0.
    """
    if mode not in NEGATIVE_MODES:
        raise ValueError(f"negative_mode must be 'paper' or 'per_rollout', got {mode!r}")
    P = _f32(rollouts)
    B, K, _ = P.shape
    if negatives is None or negatives.shape[1] == 0:
        return P.new_zeros(B, K)
    if mode == "paper":
        neg = -torch.einsum("bd,bmd->bm", _f32(anchor), _f32(negatives)).sum(-1)  # (B,)
        return neg[:, None].expand(B, K).contiguous()
    return -torch.einsum("bkd,bmd->bkm", P, _f32(negatives)).sum(-1)  # (B, K)


@full_precision
def consistency_term(rollouts: Tensor) -> Tensor:
    """``consistency`` -> (B, K): mean_{j != k} cos(x_ik, x_ij) (R_consist); zero when K == 1."""
    return _consistency(_f32(rollouts))


@full_precision
def hard_term(
    rollouts: Tensor, anchor: Tensor, mode: Literal["paper", "per_rollout", "upstream"] = "paper"
) -> Tensor:
    """``hard`` -> (B, K), the cross-group term (zero with one group).

    mode "paper": -mean_{g!=i} max_l cos(anchor_i, x_gl) (R_hard; constant within a group).
    "per_rollout": -mean_{g!=i} max_l cos(x_ik, x_gl) (sup ``hard_mode=per_rollout``).
    "upstream": -mean_{g!=i} cos(x_ik, anchor_g) (the upstream code's unsupervised term: mean,
    not max, against the other groups' anchors; unsup ``cross_group=upstream``).
    """
    if mode not in HARD_MODES:
        raise ValueError(f"hard mode must be one of {HARD_MODES}, got {mode!r}")
    a, X = _f32(anchor), _f32(rollouts)
    B, K, _ = X.shape
    if mode == "paper":
        return _hard_anchor(a, X)[:, None].expand(B, K).contiguous()  # (B, K)
    if mode == "per_rollout":
        sim = torch.einsum("ikd,gjd->ikgj", X, X)  # (B, K, B, K)
        return -_mean_over_other_groups(sim.amax(-1))  # (B, K)
    sim = torch.einsum("ikd,gd->ikg", X, a)  # (B, K, B)
    return -_mean_over_other_groups(sim)  # (B, K)


@full_precision
def infonce_term(rollouts: Tensor, anchor: Tensor, negatives: Tensor | None, tau: float) -> Tensor:
    """``infonce`` -> (B, K): `infonce_rewards`' per-rollout log-probability (1/tau units)."""
    return infonce_rewards(anchor, rollouts, negatives, tau=tau)["infonce"]


def weighted_total(terms: dict[str, Tensor], weights: dict[str, float], tau: float) -> Tensor:
    """sum_n weights[n] * terms[n] / tau, summed in ``weights``' order -> (B, K) float32."""
    total = None
    for name, w in weights.items():
        part = float(w) * terms[name]
        total = part if total is None else total + part
    if total is None:
        raise ValueError("a reward needs at least one term")
    return total / tau


def paper_terms(reward: RewardConfig) -> dict[str, dict]:
    """The paper's ``reward.terms`` for ``reward.mode``, as conf/reward/{sup,unsup}.yaml write
    them (a test keeps the two equal), with the weights and modes of ``reward`` (a
    `RewardConfig` or its typed DictConfig; the schema holds the defaults). For reward configs
    without ``terms`` (checkpoints saved before reward terms were configurable, hand-built
    dicts)."""
    here = "grace_lightning.rl.rewards."
    sim = {"_target_": here + "similarity_term", "weight": 1.0}
    if reward.mode == "sup":
        neg = {"_target_": here + "negative_term", "weight": 1.0, "mode": reward.negative_mode}
        first, hard = {"pos": sim, "neg": neg}, reward.hard_mode
    else:
        first, hard = {"self": sim}, reward.cross_group
    return {
        **first,
        "consistency": {"_target_": here + "consistency_term", "weight": reward.lambda_consistency},
        "hard": {"_target_": here + "hard_term", "weight": reward.lambda_hard, "mode": hard},
    }


# ----------------------------------------------------------------------------- rewards


@full_precision
def supervised_rewards(
    query: Tensor,
    positives: Tensor,
    negatives: Tensor | None,
    *,
    lambda_consistency: float = 0.2,
    lambda_hard: float = 0.2,
    tau: float = 0.1,
    negative_mode: Literal["paper", "per_rollout"] = "paper",
    hard_mode: Literal["paper", "per_rollout"] = "paper",
) -> dict[str, Tensor]:
    """Supervised GRACE reward (paper §3.4; upstream `train.sh`: tau=0.1, l1=l2=0.2).

    Args:
        query: (B, D) one fixed query embedding per group.
        positives: (B, K, D) rollouts of the positive document (the ones trained).
        negatives: (B, M, D) fixed negatives (paper sums over M; upstream has M=1), or None.
        negative_mode: "paper" = -sum_m cos(q_i, d-_im), constant within a group, so it cancels
            under group-mean advantages (upstream issue #4). "per_rollout" = -sum_m cos(d+_ik,
            d-_im), which varies with k.
        hard_mode: "paper" = -mean_{g!=i} max_j cos(q_i, d+_gj) (also constant within a group).
            "per_rollout" = -mean_{g!=i} max_j cos(d+_ik, d+_gj).

    Returns:
        dict of (B, K) tensors: raw signed terms `pos`, `neg`, `consistency`, `hard` (unweighted,
        unscaled) and `total` = (pos + neg + l1 consistency + l2 hard) / tau.
    """
    if negative_mode not in NEGATIVE_MODES:
        raise ValueError(f"negative_mode must be 'paper' or 'per_rollout', got {negative_mode!r}")
    if hard_mode not in ("paper", "per_rollout"):
        raise ValueError(f"hard_mode must be 'paper' or 'per_rollout', got {hard_mode!r}")
    # the undecorated terms: this function's own decorator turns autocast off (and its
    # ``__wrapped__`` shows what autocast would do, tests/test_rewards.py)
    terms = {
        "pos": similarity_term.__wrapped__(positives, query),
        "neg": negative_term.__wrapped__(positives, query, negatives, negative_mode),
        "consistency": consistency_term.__wrapped__(positives),
        "hard": hard_term.__wrapped__(positives, query, hard_mode),
    }
    weights = {"pos": 1.0, "neg": 1.0, "consistency": lambda_consistency, "hard": lambda_hard}
    return {**terms, "total": weighted_total(terms, weights, tau)}


@full_precision
def infonce_rewards(
    query: Tensor, positives: Tensor, negatives: Tensor | None, *, tau: float
) -> dict[str, Tensor]:
    """InfoNCE-style per-rollout reward (a variant beyond the paper).

    reward_ik = log softmax_c [cos(q_i, c) / tau] evaluated at c = d+_ik, with candidate set

        C_ik = {d+_ik} U {d-_im : m} U {d+_gk : g != i}

    i.e. rollout k of every group forms one in-batch "column" of B (query, positive) pairs, as in
    standard in-batch-negatives InfoNCE (SimCSE/E5) plus the group's own hard negatives. Each
    rollout therefore sees exactly 1 + M_i + (B-1) candidates and, with K=1, this is plain
    InfoNCE. Unlike the paper's `neg`/`hard`, both the numerator and the denominator depend on k,
    so the reward keeps its within-group spread. `total` == `infonce` (1/tau units, <= 0).

    Args: query (B, D), positives (B, K, D), negatives (B, M, D) or None. All-zero negative
        vectors are padding (groups with fewer than M negatives, `module._pad_negatives`, and
        the cross-rank zero padding of `module._gather`): they are not candidates (logit -inf),
        so M_i counts the real negatives of group i only.
    Returns: dict of (B, K) tensors `infonce`, `total`.
    """
    q, P = _f32(query), _f32(positives)
    B, K, _ = P.shape
    s_col = torch.einsum("id,gkd->ikg", q, P) / tau  # (B, K, B); s_col[i, k, i] is the positive
    s_pos = s_col.diagonal(dim1=0, dim2=2).T  # (B, K)
    logits = s_col
    if negatives is not None and negatives.shape[1] > 0:
        N = _f32(negatives)
        s_neg = torch.einsum("id,imd->im", q, N) / tau  # (B, M)
        s_neg = s_neg.masked_fill(~N.ne(0).any(-1), float("-inf"))  # (B, M) padding -> -inf
        logits = torch.cat([s_col, s_neg[:, None, :].expand(B, K, -1)], dim=-1)  # (B, K, B+M)
    reward = s_pos - torch.logsumexp(logits, dim=-1)  # (B, K)
    return {"infonce": reward, "total": reward}


@full_precision
def unsupervised_rewards(
    anchor: Tensor,
    rollouts: Tensor,
    *,
    lambda_consistency: float = 0.2,
    lambda_hard: float = 0.2,
    tau: float = 0.1,
    cross_group: Literal["paper", "upstream"] = "paper",
) -> dict[str, Tensor]:
    """Unsupervised GRACE reward (paper §3.4: R_self + consistency + hard "as in supervised").

    Args:
        anchor: (B, D) one low-temperature rollout of the same text (upstream T=0.5, n=1).
        rollouts: (B, K, D) the trained rollouts.
        cross_group: "paper" = -mean_{g!=i} max_l cos(anchor_i, x_gl) (R_hard with the anchor as
            q; constant within a group). "upstream" = -mean_{g!=i} cos(x_ik, anchor_g) (the
            upstream code: mean, not max, against other groups' anchors; varies with k).

    Returns:
        dict of (B, K) tensors `self`, `consistency`, `hard`, and
        `total` = (self + l1 consistency + l2 hard) / tau.
    """
    if cross_group not in ("paper", "upstream"):
        raise ValueError(f"cross_group must be 'paper' or 'upstream', got {cross_group!r}")
    terms = {
        "self": similarity_term.__wrapped__(rollouts, anchor),
        "consistency": consistency_term.__wrapped__(rollouts),
        "hard": hard_term.__wrapped__(rollouts, anchor, cross_group),
    }
    weights = {"self": 1.0, "consistency": lambda_consistency, "hard": lambda_hard}
    return {**terms, "total": weighted_total(terms, weights, tau)}


# ----------------------------------------------------------------------------- truncation


TRUNCATION_MODES = ("replace", "mask", "soft", "off")


def overlong_buffer_tokens(buffer: int | None, max_len: int) -> int:
    """L_cache in tokens: ``buffer``, or with None DAPO's ratio (4096 of 20480 = 20%) of
    ``max_len``, at least 1."""
    return int(buffer) if buffer is not None else max(1, round(0.2 * int(max_len)))


@full_precision
def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476 §3.4, overlong reward shaping), times ``factor``.

        R_length(y) = 0                                  |y| <= L_max - L_cache
                    = ((L_max - L_cache) - |y|) / L_cache  L_max - L_cache < |y| <= L_max
                    = -1                                 |y| > L_max

    lengths: (...) response tokens |y| (EOS included, as the rollout counts them); max_len:
    L_max (``rollout.max_new_tokens``); buffer: L_cache >= 1 (``reward.overlong_buffer``);
    factor: ``reward.overlong_penalty_factor`` (verl ``overlong_buffer.penalty_factor``).
    Returns float32 (...) in [-factor, 0]; a response cut off at L_max gets -factor.
    verl: ``min(-(|y| - (L_max - L_cache)) / L_cache * factor, 0)``.
    """
    if buffer < 1 or buffer > max_len:
        raise ValueError(f"overlong buffer must be in [1, max_len={max_len}], got {buffer}")
    y = _f32(lengths)
    ramp = ((max_len - buffer) - y) / buffer  # (...) > 0 before the buffer, -1 at L_max
    return ramp.clamp(min=-1.0, max=0.0) * float(factor)


@full_precision
def apply_truncation(
    rewards: Tensor,
    truncated: Tensor,
    mode: Literal["replace", "mask", "soft", "off"] = "replace",
    value: float = -1.0,
    *,
    lengths: Tensor | None = None,
    max_len: int | None = None,
    buffer: int | None = None,
    penalty_factor: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Handle responses that hit the length limit without EOS.

    Args:
        rewards: (B, K) total rewards (already divided by tau).
        truncated: (B, K) bool.
        mode:
            "replace": upstream GRACE: the total reward becomes `value` (-1.0, NOT divided by
                tau); loss weight 1.
            "mask": (DAPO overlong filtering / TRL `mask_truncated_completions`) the rollout gets
                loss weight 0 AND its reward becomes NaN, so `group_advantages` leaves it out of
                its group's mean/std (nan-mean) and gives it advantage 0. It is treated as if it
                had never been sampled. (TRL keeps such rewards in the group mean; we do not.)
                Reward logging must then use nan-aware reductions.
            "soft": DAPO's soft overlong punishment (`overlong_penalty`) ADDED to every
                rollout's reward, truncated or not: 0 up to ``max_len - buffer`` tokens, then a
                linear ramp to ``-penalty_factor`` at ``max_len`` (a cut-off response gets
                ``-penalty_factor``, NOT divided by tau). Its reward terms are kept, so a
                truncated rollout still ranks within its group; loss weight 1. Needs
                ``lengths`` and ``max_len``. verl ``reward_model.overlong_buffer``.
            "off": unchanged, loss weight 1.
        value: the "replace" reward.
        lengths: (B, K) response tokens of each rollout (mode "soft").
        max_len: L_max = ``rollout.max_new_tokens`` (mode "soft").
        buffer: L_cache tokens (mode "soft"); None = 20% of ``max_len`` (DAPO's 4096 / 20480).
        penalty_factor: the penalty's scale (mode "soft"; DAPO/verl 1.0).

    Returns:
        rewards (B, K) float32, loss_weight (B, K) float (multiply it into the token mask).
    """
    rewards, truncated = _f32(rewards), truncated.bool()
    ones = torch.ones_like(rewards)
    if mode == "replace":
        return rewards.masked_fill(truncated, value), ones
    if mode == "mask":
        return rewards.masked_fill(truncated, float("nan")), (~truncated).to(rewards.dtype)
    if mode == "soft":
        if lengths is None or max_len is None:
            raise ValueError("truncation mode 'soft' needs the rollouts' lengths and max_len")
        cache = overlong_buffer_tokens(buffer, max_len)
        penalty = overlong_penalty(lengths.view(rewards.shape), max_len, cache, penalty_factor)
        return rewards + penalty, ones
    if mode == "off":
        return rewards, ones
    raise ValueError(f"mode must be one of {TRUNCATION_MODES}, got {mode!r}")


def validate_truncation_config(reward, max_new_tokens: int, error: type[Exception] = ValueError):
    """Startup checks of ``reward.truncation`` and, for ``soft``, ``reward.overlong_buffer`` /
    ``reward.overlong_penalty_factor`` (values as given; absent keys = the schema's defaults).
    Raises ``error(what to change)``."""
    mode = reward.get("truncation", RewardConfig.truncation)
    if mode not in TRUNCATION_MODES:
        raise error(f"reward.truncation={mode!r}: use replace, mask, soft or off")
    buffer = reward.get("overlong_buffer", RewardConfig.overlong_buffer)
    if buffer is not None and (isinstance(buffer, bool) or not isinstance(buffer, int)):
        raise error(f"reward.overlong_buffer={buffer!r}: a whole number of tokens, or null")
    factor = reward.get("overlong_penalty_factor", RewardConfig.overlong_penalty_factor)
    if isinstance(factor, bool) or not isinstance(factor, int | float) or factor < 0:
        raise error(f"reward.overlong_penalty_factor={factor!r}: use a number >= 0 (DAPO/verl 1.0)")
    if mode != "soft" or buffer is None:
        return
    if not 1 <= buffer <= max_new_tokens:
        raise error(
            f"reward.overlong_buffer={buffer}: the soft penalty's ramp (DAPO L_cache) must be "
            f"1..rollout.max_new_tokens={max_new_tokens} tokens; set reward.overlong_buffer to "
            f"at most {max_new_tokens}, or null (20% of rollout.max_new_tokens, DAPO's ratio)"
        )
