"""Embeddings without a rationale (the paper's Base row) and pooling helpers.

With a rationale, embeddings come straight out of the rollout loop (`rollout/engine.py`).
"""

from __future__ import annotations

import torch

from grace_lightning.rollout.engine import left_pad, pooling_mask, positions_from_mask


def masked_mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over positions where ``mask`` is true. hidden: (B, T, D), mask: (B, T) -> (B, D)."""
    mask = mask.bool()
    total = torch.where(mask[..., None], hidden.float(), 0.0).sum(1)
    return total / mask.sum(-1, keepdim=True).clamp(min=1)


@torch.no_grad()
def encode_prompts(
    model, prompt_ids: list[list[int]], system_len: int, pad_id: int, batch_size: int = 16
) -> torch.Tensor:
    """Mean-pooled last-layer hidden states over each prompt after the system prompt: (N, D).

    Not normalised (upstream's eval does not normalise; cosine similarity does not care).
    """
    device = next(model.parameters()).device
    decoder = model.get_decoder()
    out = []
    for start in range(0, len(prompt_ids), batch_size):
        ids, mask = left_pad(prompt_ids[start : start + batch_size], pad_id, device)
        hidden = decoder(
            input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)
        ).last_hidden_state
        out.append(masked_mean_pool(hidden, pooling_mask(mask, system_len)).cpu())
    return torch.cat(out) if out else torch.empty(0)
