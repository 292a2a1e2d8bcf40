"""Collapse diagnostics: does the policy write one text-independent rationale for every text?

Unsupervised GRACE can collapse: its reward (self-similarity + within-group consistency) is
maximised by one generic rationale, whatever the text. The signs, logged while it happens:

- ``collapse/distinct_<n>``: distinct-n (Li et al. 2016) over the batch's rationales: unique
  n-grams / all n-grams, pooled over every rollout of every group. Near 1 for varied text; it
  falls towards 1 / (number of rationales) when every rationale is the same.
- ``collapse/cross_group_duplicate``: fraction of rationales whose exact token sequence also
  appears in ANOTHER group (a collapsed policy writes the same text for different inputs).
- ``collapse/cross_group_cosine``: mean cosine between embeddings of rollouts of DIFFERENT
  groups (within-group pairs excluded). Rises towards 1 as embeddings stop depending on the text.
- ``collapse/within_group_cosine``: the same within groups (k != l), for comparison: a healthy
  run has within >> cross; collapse shows as cross -> within.

The token entropy of the policy is logged by the update (``entropy``). All functions return
plain floats; `collapse_metrics` returns them under the names above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from grace_lightning.rl.precision import f32, full_precision

__all__ = [
    "collapse_metrics",
    "cross_group_cosine",
    "cross_group_duplicate",
    "distinct_n",
    "rationale_tokens",
    "within_group_cosine",
]


def rationale_tokens(response_ids: Tensor, response_mask: Tensor) -> list[list[int]]:
    """(N, R) right-padded ids + mask -> each row's token ids (mask != 0)."""
    return [ids[m.bool()].tolist() for ids, m in zip(response_ids, response_mask)]


def distinct_n(sequences: list[list], n: int) -> float:
    """Unique n-grams / all n-grams over all sequences (distinct-n). 0 when there is none.

    sequences: token ids (or words) per rationale; n-grams never cross two sequences.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def cross_group_duplicate(sequences: list[list], num_generations: int) -> float:
    """Fraction of sequences equal to a sequence of another group (rows are grouped in order,
    ``num_generations`` per group)."""
    groups_of: dict[tuple, set[int]] = {}
    for r, s in enumerate(sequences):
        groups_of.setdefault(tuple(s), set()).add(r // num_generations)
    dup = [len(groups_of[tuple(s)]) > 1 for s in sequences]
    return sum(dup) / len(dup) if dup else 0.0


@full_precision
def cross_group_cosine(emb: Tensor) -> float:
    """Mean cos(x_ik, x_gl) over all pairs with g != i. emb: (B, K, D). NaN when B < 2.

    With unit vectors u, S_i = sum_k u_ik and S = sum_i S_i: the sum over all ordered pairs is
    |S|^2, the within-group ones (k = l included) sum to sum_i |S_i|^2, so the cross-group sum
    is their difference, over (BK)^2 - B K^2 ordered pairs. O(BKD), no (BK)^2 matrix.
    """
    B, K, _ = emb.shape
    if B < 2:
        return float("nan")
    u = F.normalize(f32(emb), dim=-1)  # (B, K, D)
    per_group = u.sum(1)  # (B, D)
    total = per_group.sum(0)  # (D,)
    cross = total.pow(2).sum() - per_group.pow(2).sum()
    return float(cross / ((B * K) ** 2 - B * K * K))


@full_precision
def within_group_cosine(emb: Tensor) -> float:
    """Mean cos(x_ik, x_il) over k != l within each group. emb: (B, K, D). NaN when K < 2."""
    B, K, _ = emb.shape
    if K < 2:
        return float("nan")
    u = F.normalize(f32(emb), dim=-1)
    per_group = u.sum(1)  # (B, D)
    within = per_group.pow(2).sum() - u.pow(2).sum()  # minus the k == l terms (|u|^2 = 1)
    return float(within / (B * K * (K - 1)))


@torch.no_grad()
def collapse_metrics(
    response_ids: Tensor,
    response_mask: Tensor,
    embeddings: Tensor,
    num_generations: int,
    ngrams: tuple[int, ...] = (2, 3),
) -> dict[str, float]:
    """All collapse metrics of one rollout batch.

    response_ids/mask: (B*K, R) the policy rows, grouped (row i*K + k = rollout k of group i);
    embeddings: (B, K, D) the rollouts' embeddings (``RolloutBatch.embeddings`` viewed (B, K, D):
    what the reward sees, text + rationale); num_generations: K.
    """
    seqs = rationale_tokens(response_ids, response_mask)
    out = {f"collapse/distinct_{n}": distinct_n(seqs, n) for n in ngrams}
    out["collapse/cross_group_duplicate"] = cross_group_duplicate(seqs, num_generations)
    out["collapse/cross_group_cosine"] = cross_group_cosine(embeddings)
    out["collapse/within_group_cosine"] = within_group_cosine(embeddings)
    return out
