"""Left padding, the position ids that follow it, and the pooling mask (shared by every pass)."""

from __future__ import annotations

import torch


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and mask, padded on the left."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, length - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, length - len(s) :] = 1
    return ids.to(device), mask.to(device)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that follow the attention mask under left padding."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def pooling_mask(prompt_mask: torch.Tensor, system_len: int) -> torch.Tensor:
    """Prompt positions that enter the mean: valid tokens after the first ``system_len``."""
    return prompt_mask.bool() & (prompt_mask.cumsum(-1) > system_len)
