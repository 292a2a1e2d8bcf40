"""A researcher's own module: an advantage estimator and a reward term, outside grace_lightning.

docs/extending.md walks through it; tests/test_extending.py trains with it. From a checkout:

    PYTHONPATH=tests/user_ext python train.py algo.advantage._target_=my_ext.flipped_grpo
    PYTHONPATH=tests/user_ext python train.py '+reward.terms.length={_target_:my_ext.length_reward,weight:0.1}'
"""

from __future__ import annotations

import torch

from grace_lightning.rl.advantages import group_advantages

CALLS: list[dict] = []  # one entry per call: what the run passed (tests read it)


def flipped_grpo(rewards: torch.Tensor, scale: str = "none", **inputs) -> torch.Tensor:
    """GRPO's group-centred advantage with its sign flipped (rewards (B, K) -> (B, K)).

    ``scale`` is algo.scale_rewards; ``**inputs`` takes the other inputs (token_counts, baseline,
    step) without naming them.
    """
    CALLS.append({"fn": "flipped_grpo", "shape": tuple(rewards.shape), "dtype": rewards.dtype})
    CALLS[-1]["inputs"] = sorted(inputs)
    return -group_advantages(rewards, scale=scale)


def length_reward(lengths: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Each rollout's share of the token budget, (B, K) in [0, 1] (a longer rationale scores more)."""
    CALLS.append({"fn": "length_reward", "shape": tuple(lengths.shape), "dtype": lengths.dtype})
    return lengths / max_new_tokens


def echo_penalty(texts: list[str], completions: list[list[str]]) -> torch.Tensor:
    """Minus the share of each rationale's words that also occur in its text, (B, K) in [-1, 0]:
    a rationale that copies its input scores lower (texts: B strings; completions: B lists of K)."""
    shape = (len(completions), len(completions[0]))
    CALLS.append({"fn": "echo_penalty", "shape": shape, "texts": texts, "completions": completions})
    rows = []
    for text, group in zip(texts, completions, strict=True):
        vocab = set(text.lower().split())
        rows.append(
            [-sum(w in vocab for w in c.lower().split()) / max(1, len(c.split())) for c in group]
        )
    return torch.tensor(rows, dtype=torch.float32)
