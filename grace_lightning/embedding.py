"""Embeddings without a rationale (the paper's Base row) and pooling helpers.

With a rationale, embeddings come straight out of the rollout loop (`rollout/engine.py`).
"""

from __future__ import annotations

import torch

from grace_lightning.rollout.engine import cache_kwarg
from grace_lightning.rollout.kv import (
    SegmentedCache,
    num_layers,
    prefix_kv,
    shared_prefix_len,
    suffix_batch,
    supports_segmented_cache,
)
from grace_lightning.rollout.padding import left_pad, pooling_mask, positions_from_mask


def masked_mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over positions where ``mask`` is true. hidden: (B, T, D), mask: (B, T) -> (B, D)."""
    mask = mask.bool()
    total = torch.where(mask[..., None], hidden.float(), 0.0).sum(1)
    return total / mask.sum(-1, keepdim=True).clamp(min=1)


@torch.no_grad()
def encode_prompts(
    model,
    prompt_ids: list[list[int]],
    system_len: int,
    pad_id: int,
    batch_size: int = 16,
    share_prefix: bool = True,
) -> torch.Tensor:
    """Mean-pooled last-layer hidden states over each prompt after the system prompt: (N, D).

    Not normalised (upstream's eval does not normalise; cosine similarity does not care).
    ``share_prefix``: the leading tokens every prompt shares (at most ``system_len``: the system
    prompt and chat header, which pooling skips) are run once, batch 1, and their KV reused by
    every batch; each batch runs only [left-padded text part] after it (`rollout.kv`). Same
    vectors as the unshared path (tests/test_prefix.py); on short texts most of the work is saved.
    """
    device = next(model.parameters()).device
    decoder = model.get_decoder()
    start = 0
    if share_prefix and supports_segmented_cache(model):
        start = shared_prefix_len(prompt_ids, system_len)
    prefix = None
    if start:
        key = cache_kwarg(decoder)
        prefix = prefix_kv(decoder, key, prompt_ids[0][:start], num_layers(model), device)
    out = []
    for first in range(0, len(prompt_ids), batch_size):
        batch = prompt_ids[first : first + batch_size]
        if prefix is not None:
            ids, mask, pos = suffix_batch(batch, start, pad_id, device)  # (B, T), (B, S + T)
            hidden = decoder(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                **{key: SegmentedCache(num_layers(model), prefix)},
            ).last_hidden_state  # (B, T, D)
            pool = pooling_mask(mask[:, start:], system_len - start)  # (B, T)
        else:
            ids, mask = left_pad(batch, pad_id, device)  # (B, L)
            hidden = decoder(
                input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)
            ).last_hidden_state  # (B, L, D)
            pool = pooling_mask(mask, system_len)
        out.append(masked_mean_pool(hidden, pool).cpu())
    return torch.cat(out) if out else torch.empty(0)
