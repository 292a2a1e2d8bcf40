"""Hand-checked advantage estimators."""

from __future__ import annotations

import math

import pytest
import torch

from grace_lightning.rl.advantages import (
    group_advantages,
    reinforce_pp_advantages,
    remax_advantages,
    rloo_advantages,
    zero_std_groups,
)

NAN = float("nan")
R = torch.tensor([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]], dtype=torch.float64)
# batch std of [1, 2, 3, 4, 4, 4]: mean 3, squared deviations 4+1+0+1+1+1 = 8, unbiased 8/5
BATCH_STD = math.sqrt(8 / 5)  # 1.2649


def close(actual, expected):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype))


def test_group_advantages_no_scaling_is_paper_default():
    # group means 2 and 4 -> (-1, 0, 1), (0, 0, 0)
    close(group_advantages(R), [[-1, 0, 1], [0, 0, 0]])
    close(group_advantages(R, scale="none"), [[-1, 0, 1], [0, 0, 0]])


def test_group_advantages_group_and_batch_scaling():
    eps = 1e-4
    # group std (unbiased): g0 [1,2,3] -> 1; g1 constant -> 0, and 0 / (0 + eps) = 0
    close(
        group_advantages(R, scale="group", eps=eps), [[-1 / (1 + eps), 0, 1 / (1 + eps)], [0] * 3]
    )
    s = BATCH_STD + eps
    close(group_advantages(R, scale="batch", eps=eps), [[-1 / s, 0, 1 / s], [0, 0, 0]])
    with pytest.raises(ValueError):
        group_advantages(R, scale="global")


def test_group_advantages_nan_rewards_are_excluded_and_get_zero():
    r = torch.tensor([[1.0, NAN, 5.0], [NAN, NAN, NAN]])
    # g0 nan-mean (1 + 5)/2 = 3 -> (-2, 0, 2); g1 all masked -> 0
    close(group_advantages(r), [[-2, 0, 2], [0, 0, 0]])
    # g0 std over (1, 5): unbiased (4 + 4)/1 = 8 -> 2 sqrt 2
    s = 2 * math.sqrt(2) + 1e-4
    close(group_advantages(r, scale="group"), [[-2 / s, 0, 2 / s], [0, 0, 0]])


def test_rloo():
    # k0: 1 - (2+3)/2 = -1.5;  k1: 2 - (1+3)/2 = 0;  k2: 3 - (1+2)/2 = 1.5  (= 3/2 * (r - 2))
    close(rloo_advantages(R), [[-1.5, 0, 1.5], [0, 0, 0]])
    # NaN left out: [1, nan, 5] -> 1 - 5 = -4, 0, 5 - 1 = 4; a single valid reward -> 0
    r = torch.tensor([[1.0, NAN, 5.0], [NAN, 2.0, NAN]])
    close(rloo_advantages(r), [[-4, 0, 4], [0, 0, 0]])


def test_reinforce_pp_batch_normalised_without_groups():
    # no token counts: every sequence weighs 1; mean 3 -> (r - 3) / sqrt(var + 1e-8) (verl eps)
    expected = (R - 3) / math.sqrt(BATCH_STD**2 + 1e-8)
    close(reinforce_pp_advantages(R), expected)
    close(reinforce_pp_advantages(R.flatten()), expected.flatten())


def test_reinforce_pp_token_weighted_hand_worked():
    # rewards [1, 3] over 3 and 1 tokens: n = 4, mean (3*1 + 1*3)/4 = 1.5,
    # unbiased var (3*0.25 + 1*2.25)/3 = 1 -> [-0.5, 1.5]; per sequence it would be -+0.7071
    r = torch.tensor([1.0, 3.0], dtype=torch.float64)
    close(reinforce_pp_advantages(r, torch.tensor([3.0, 1.0])), [-0.5, 1.5])
    close(reinforce_pp_advantages(r), [-math.sqrt(0.5), math.sqrt(0.5)])
    # NaN reward or zero tokens: left out of the statistics, advantage 0
    r3 = torch.tensor([1.0, 3.0, NAN, 100.0], dtype=torch.float64)
    close(reinforce_pp_advantages(r3, torch.tensor([3.0, 1.0, 5.0, 0.0])), [-0.5, 1.5, 0, 0])
    # nothing left, or a single token: zeros, not NaN
    close(reinforce_pp_advantages(r, torch.zeros(2)), [0.0, 0.0])
    close(reinforce_pp_advantages(r, torch.tensor([1.0, 0.0])), [0.0, 0.0])


def _verl_reinforce_pp(token_level_rewards, response_mask, gamma=1.0):
    """verl core_algos.compute_reinforce_plus_plus_outcome_advantage + masked_whiten, verbatim
    in substance (torch_functional.masked_var with unbiased=True)."""
    returns = torch.zeros_like(token_level_rewards)
    running = 0
    for t in reversed(range(token_level_rewards.shape[1])):
        running = token_level_rewards[:, t] + gamma * running
        returns[:, t] = running
        running = running * response_mask[:, t]
    m = response_mask
    mean = (returns * m).sum() / m.sum()
    var = (((returns - mean) ** 2) * m).sum() / m.sum() * (m.sum() / (m.sum() - 1))
    return (returns - mean) * torch.rsqrt(var + 1e-8) * m


def test_reinforce_pp_equals_verl_token_whitening():
    g = torch.Generator().manual_seed(0)
    B, K, T = 3, 4, 9
    rewards = torch.randn(B, K, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B, K), generator=g)
    mask = (torch.arange(T) < lengths.reshape(-1, 1)).double()  # (N, T) right-padded
    token_rewards = torch.zeros(B * K, T, dtype=torch.float64)
    token_rewards[torch.arange(B * K), lengths.reshape(-1) - 1] = rewards.reshape(-1)
    verl = _verl_reinforce_pp(token_rewards, mask)  # (N, T), constant along each response
    ours = reinforce_pp_advantages(rewards, lengths)  # (B, K)
    torch.testing.assert_close(verl, ours.reshape(-1, 1) * mask, atol=1e-12, rtol=0)
    # per-sequence whitening (the old behaviour) is measurably different for unequal lengths
    assert (reinforce_pp_advantages(rewards) - ours).abs().max() > 1e-2


def test_remax():
    r = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    close(remax_advantages(r, torch.tensor([2.0, 6.0])), [[-1, 0, 1], [-2, -1, 0]])


def test_zero_std_groups():
    r = torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0], [5.0, 5.0 + 1e-8, 5.0], [NAN, 2.0, NAN]])
    z = zero_std_groups(r)
    assert z.tolist() == [True, False, True, True]
    assert z.float().mean().item() == pytest.approx(0.75)  # TRL frac_reward_zero_std


@pytest.mark.parametrize(
    "fn",
    [
        group_advantages,
        lambda r: group_advantages(r, scale="group"),
        lambda r: group_advantages(r, scale="batch"),
        rloo_advantages,
        reinforce_pp_advantages,
        lambda r: reinforce_pp_advantages(r, torch.arange(1, 9).repeat(4, 1)),
        lambda r: remax_advantages(r, r[:, 0] - 0.01),
    ],
    ids=["grpo", "grpo_group", "grpo_batch", "rloo", "reinforce_pp", "reinforce_pp_tok", "remax"],
)
def test_advantages_run_in_fp32_under_bf16_autocast(fn):
    # tight rewards (spread 1e-3 around 5): bf16 (8-bit mantissa, step 0.03 at 5) would zero them
    g = torch.Generator().manual_seed(0)
    rewards = 5 + 1e-3 * torch.randn(4, 8, generator=g)
    ref = fn(rewards)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fn(rewards)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert ref.abs().max() > 1e-4  # there is a within-group signal to lose
