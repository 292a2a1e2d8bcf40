"""reward.truncation=soft: DAPO's soft overlong punishment (rl/rewards.py), on hand-worked
numbers, under bf16 autocast, through the module's config keys and the startup checks."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from hydra.errors import ConfigCompositionException

from grace_lightning.config import ConfigError, validate
from grace_lightning.module import GraceModule
from grace_lightning.rl.advantages import group_advantages
from grace_lightning.rl.rewards import (
    apply_truncation,
    overlong_buffer_tokens,
    overlong_penalty,
)
from grace_lightning.schema import RewardConfig, typed

from .test_train import make_cfg


def test_overlong_penalty_hand_worked():
    # L_max 10, L_cache 4: free up to 6 tokens, then -1/4 a token, -1 at 10 (and beyond)
    lengths = torch.tensor([0, 3, 6, 7, 8, 9, 10, 12])
    want = torch.tensor([0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0])
    torch.testing.assert_close(overlong_penalty(lengths, 10, 4), want, atol=0, rtol=0)
    # factor scales it (DAPO/verl penalty_factor); buffer = L_max: the ramp starts at 0 tokens
    torch.testing.assert_close(overlong_penalty(lengths, 10, 4, 0.5), want * 0.5)
    got = overlong_penalty(torch.tensor([0, 5, 10]), 10, 10)
    torch.testing.assert_close(got, torch.tensor([0.0, -0.5, -1.0]))
    # buffer 1: only a response that reaches L_max is punished
    got = overlong_penalty(torch.tensor([8, 9, 10]), 10, 1)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -1.0]))
    for bad in (0, 11):
        with pytest.raises(ValueError, match="overlong buffer"):
            overlong_penalty(lengths, 10, bad)


def test_buffer_default_is_dapos_ratio():
    assert overlong_buffer_tokens(None, 20480) == 4096  # DAPO: L_max 20480, L_cache 4096
    assert overlong_buffer_tokens(None, 64) == 13  # round(12.8)
    assert overlong_buffer_tokens(None, 2) == 1  # never 0 (division by L_cache)
    assert overlong_buffer_tokens(7, 64) == 7


def test_soft_mode_adds_the_penalty_and_keeps_every_rollout():
    rewards = torch.tensor([[2.0, 1.0], [0.5, -0.5]])  # (B, K), already / tau
    lengths = torch.tensor([[6, 9], [10, 2]])
    truncated = torch.tensor([[False, False], [True, False]])  # 10 = L_max without EOS
    out, w = apply_truncation(
        rewards, truncated, "soft", lengths=lengths, max_len=10, buffer=4, penalty_factor=1.0
    )
    # 9 tokens: (6 - 9) / 4 = -0.75; cut off at 10: -1 (NOT divided by tau)
    torch.testing.assert_close(out, torch.tensor([[2.0, 0.25], [-0.5, -0.5]]))
    torch.testing.assert_close(w, torch.ones(2, 2))
    # buffer None = 20% of 10 = 2 tokens: 9 -> (8 - 9) / 2 = -0.5, 10 -> -1
    out, _ = apply_truncation(rewards, truncated, "soft", lengths=lengths, max_len=10)
    torch.testing.assert_close(out, torch.tensor([[2.0, 0.5], [-0.5, -0.5]]))
    with pytest.raises(ValueError, match="needs the rollouts' lengths"):
        apply_truncation(rewards, truncated, "soft")


def test_the_other_modes_ignore_lengths():
    rewards = torch.tensor([[2.0, 1.0]])
    truncated = torch.tensor([[True, False]])
    lengths = torch.tensor([[10, 9]])
    kw = dict(lengths=lengths, max_len=10, buffer=4)
    out, w = apply_truncation(rewards, truncated, "replace", -1.0, **kw)
    assert out.tolist() == [[-1.0, 1.0]] and w.tolist() == [[1.0, 1.0]]
    out, w = apply_truncation(rewards, truncated, "mask", **kw)
    assert torch.isnan(out[0, 0]) and out[0, 1] == 1.0 and w.tolist() == [[0.0, 1.0]]
    out, w = apply_truncation(rewards, truncated, "off", **kw)
    assert out.tolist() == [[2.0, 1.0]] and w.tolist() == [[1.0, 1.0]]
    with pytest.raises(ValueError, match="soft"):
        apply_truncation(rewards, truncated, "drop")


def test_soft_keeps_signal_where_replace_loses_it():
    """A group cut off everywhere: replace gives every rollout -1 (advantage 0, nothing
    learned); soft keeps their reward terms apart (advantages +-1) and still punishes length."""
    rewards = torch.tensor([[3.0, 1.0]])
    truncated = torch.tensor([[True, True]])
    lengths = torch.tensor([[10, 10]])
    rep, _ = apply_truncation(rewards, truncated, "replace")
    assert group_advantages(rep).tolist() == [[0.0, 0.0]]
    soft, _ = apply_truncation(rewards, truncated, "soft", lengths=lengths, max_len=10, buffer=4)
    assert soft.tolist() == [[2.0, 0.0]]
    assert group_advantages(soft).tolist() == [[1.0, -1.0]]
    # and within a group the shorter of two equal-reward rollouts gets the higher advantage
    soft, _ = apply_truncation(
        torch.tensor([[1.0, 1.0]]),
        torch.tensor([[False, False]]),
        "soft",
        lengths=torch.tensor([[7, 9]]),
        max_len=10,
        buffer=4,
    )
    assert group_advantages(soft).tolist() == [[0.25, -0.25]]


def test_soft_is_fp32_under_bf16_autocast():
    # 256 - 0.25 = 255.75 is not a bf16 number (spacing 1 below 256): bf16 would give 256
    rewards = torch.tensor([[256.0]], dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, w = apply_truncation(
            rewards,
            torch.tensor([[False]]),
            "soft",
            lengths=torch.tensor([[7]]),
            max_len=10,
            buffer=4,
        )
    assert out.dtype == torch.float32 and w.dtype == torch.float32
    assert out.item() == 255.75


def test_module_passes_the_config_keys():
    """GraceModule._truncate reads reward.truncation / overlong_* and rollout.max_new_tokens."""
    soft = {"truncation": "soft", "overlong_buffer": 4, "overlong_penalty_factor": 2.0}
    fake = SimpleNamespace(
        reward_cfg=typed(RewardConfig, soft),  # as GraceModule holds it
        rollout_cfg={"max_new_tokens": 10},
    )
    out, w = GraceModule._truncate(
        fake, torch.tensor([[1.0, 1.0]]), torch.tensor([[False, True]]), torch.tensor([[8, 10]])
    )
    torch.testing.assert_close(out, torch.tensor([[0.0, -1.0]]))  # 1 - 2*0.5, 1 - 2*1
    # the schema's defaults: buffer null = 20% (2 tokens), factor 1
    fake.reward_cfg = typed(RewardConfig, {"truncation": "soft"})
    out, _ = GraceModule._truncate(
        fake, torch.tensor([[1.0, 1.0]]), torch.tensor([[False, True]]), torch.tensor([[9, 10]])
    )
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.0]]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["reward.truncation=clip"], "reward.truncation='clip': use replace, mask, soft or off"),
        (
            ["reward.truncation=soft", "rollout.max_new_tokens=16", "reward.overlong_buffer=32"],
            "set reward.overlong_buffer to at most 16",
        ),
        (["reward.truncation=soft", "reward.overlong_buffer=0"], "reward.overlong_buffer=0"),
        (
            ["reward.overlong_buffer=1.5"],
            "converted to Integer\n *full_key: reward.overlong_buffer",
        ),
        (["reward.overlong_penalty_factor=-1"], "reward.overlong_penalty_factor=-1"),
    ],
)
def test_bad_length_config_fails_at_startup(overrides, message, tmp_path):
    # a wrong type fails while composing (reward is a typed group, grace_lightning/schema.py;
    # Hydra names full_key), a value out of range in validate: both before any model loads
    with pytest.raises((ConfigCompositionException, ConfigError)) as err:
        validate(make_cfg(overrides, tmp_path))
    assert re.search(message, f"{err.value} {err.value.__cause__}")


@pytest.mark.parametrize("reward", ["sup", "unsup"])
def test_soft_composes_with_the_defaults(reward, tmp_path):
    cfg = make_cfg([f"reward={reward}", "reward.truncation=soft"], tmp_path)
    validate(cfg)  # null buffer: 20% of rollout.max_new_tokens
    assert cfg.reward.overlong_buffer is None and cfg.reward.overlong_penalty_factor == 1.0
    assert make_cfg([f"reward={reward}"], tmp_path).reward.truncation == "replace"  # the paper


def test_tiny_remax_run_gets_soft_rewards_for_sampled_and_greedy_rollouts(tmp_path, monkeypatch):
    """End to end: every reward that reaches the advantage (the K sampled rollouts' and ReMax's
    greedy baseline) is the reward total + the soft penalty of that rollout's own length."""
    from grace_lightning import module as module_mod
    from grace_lightning.train import train

    from .test_train import TINY

    real_trunc, real_adv = module_mod.reward_fns.apply_truncation, GraceModule.compute_advantages
    trunc_calls, adv_calls = [], []

    def spy_trunc(total, truncated, *args, **kw):
        out = real_trunc(total, truncated, *args, **kw)
        trunc_calls.append((total.clone(), kw["lengths"].clone(), out[0].clone()))
        return out

    def spy_adv(self, rewards, baseline=None, token_counts=None):
        adv_calls.append((rewards.clone(), baseline.clone()))
        return real_adv(self, rewards, baseline, token_counts)

    monkeypatch.setattr(module_mod.reward_fns, "apply_truncation", spy_trunc)
    monkeypatch.setattr(GraceModule, "compute_advantages", spy_adv)
    cfg = make_cfg(
        [*TINY, "reward=sup", "callbacks=none", "algo=remax", "reward.truncation=soft"], tmp_path
    )
    train(cfg)
    max_len = cfg.rollout.max_new_tokens  # 6: buffer null -> round(1.2) = 1 token
    assert trunc_calls and adv_calls
    for total, lengths, out in trunc_calls:
        assert lengths.shape == total.shape and lengths.max() <= max_len
        torch.testing.assert_close(out, total + overlong_penalty(lengths, max_len, 1))
    (_, lengths, sampled), (_, _, greedy) = trunc_calls[:2]  # order in training_step
    assert lengths.shape[1] == cfg.rollout.num_generations
    rewards, baseline = adv_calls[0]
    torch.testing.assert_close(rewards, sampled)
    torch.testing.assert_close(baseline, greedy[:, 0])
