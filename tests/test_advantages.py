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
    s = BATCH_STD + 1e-4
    # mean 3 over all six rewards -> (r - 3) / s
    expected = (R - 3) / s
    close(reinforce_pp_advantages(R), expected)
    close(reinforce_pp_advantages(R.flatten()), expected.flatten())


def test_remax():
    r = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    close(remax_advantages(r, torch.tensor([2.0, 6.0])), [[-1, 0, 1], [-2, -1, 0]])


def test_zero_std_groups():
    r = torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0], [5.0, 5.0 + 1e-8, 5.0], [NAN, 2.0, NAN]])
    z = zero_std_groups(r)
    assert z.tolist() == [True, False, True, True]
    assert z.float().mean().item() == pytest.approx(0.75)  # TRL frac_reward_zero_std
