"""The joint objective wired into the update and the module (algo.contrastive_*), and the
collapse diagnostics in a training run. The loss itself is tested in test_joint.py."""

from __future__ import annotations

import copy
import math
import re
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from hydra.errors import ConfigCompositionException

from grace_lightning.config import ConfigError, validate
from grace_lightning.rl.joint import JointTargets, rollout_infonce, rows_logprobs_and_embedding
from grace_lightning.rl.update import PolicyUpdater, UpdateConfig, UpdateHooks, score_rows

from .test_train import TINY, make_cfg, metric_rows
from .test_update import K, P, R, make_rollouts

SYSTEM_LEN = 1  # the first real prompt token is left out of the pooling (as a system prompt)
ALPHA = 0.7


@pytest.fixture(scope="module")
def setup(tiny_backbone):
    """A policy, a rollout batch (old log-probs a little off-policy), advantages, a masked row,
    and stop-gradient anchors: P queries and 2 hard negatives per group (one zero = padding)."""
    model, _ = tiny_backbone
    policy = copy.deepcopy(model).float().train()
    ro = make_rollouts(policy.config.vocab_size, seed=3)
    g = torch.Generator().manual_seed(5)
    exact = score_rows(policy, ro, [torch.arange(P * K)], share_prompt=False)
    ro.logprobs = (exact + 0.3 * torch.randn(exact.shape, generator=g)) * ro.response_mask
    advantages = torch.randn(P * K, generator=g)
    loss_weight = torch.ones(P * K)
    loss_weight[4] = 0.0  # e.g. a masked truncated rollout: out of the PPO loss, not the joint's
    d = policy.config.hidden_size
    query = torch.randn(P, d, generator=g)
    negatives = torch.randn(P, 2, d, generator=g)
    negatives[1, 1] = 0.0  # padding: never a candidate
    return policy, ro, advantages, loss_weight, query, negatives


def targets(ro, query, negatives, weight=ALPHA, in_batch=True) -> JointTargets:
    return JointTargets(
        query, negatives, ro.row_to_prompt, SYSTEM_LEN, weight=weight, tau=0.1, in_batch=in_batch
    )


def update_grads(policy, ro, adv, weight, joint, **cfg_kw):
    """Gradients (and metrics) of one optimiser step over the whole batch (one mini-batch)."""
    got: dict[str, torch.Tensor] = {}

    def step():
        got.update({n: p.grad.detach().clone() for n, p in policy.named_parameters()})

    cfg = UpdateConfig(
        num_generations=K,
        prompts_per_minibatch=P,
        max_completion_length=R,
        grad_clip=None,
        **cfg_kw,
    )
    hooks = UpdateHooks(zero_grad=lambda: policy.zero_grad(set_to_none=True), step=step)
    updater = PolicyUpdater(cfg, policy, hooks, reference=lambda: nullcontext())
    metrics = updater.update(ro, adv, weight, joint=joint)
    assert got, "the step never ran"
    return got, metrics


def joint_grads_alone(policy, ro, query, negatives, in_batch=True):
    """alpha * mean over ALL rows of the per-row InfoNCE, by hand: one forward, no updater."""
    policy.zero_grad(set_to_none=True)
    rows = torch.arange(P * K)
    _, _, pooled = rows_logprobs_and_embedding(policy, ro, rows, SYSTEM_LEN, share_prompt=False)
    per_row = rollout_infonce(
        pooled, ro.row_to_prompt, query, negatives, tau=0.1, in_batch=in_batch
    )  # (N,)
    (ALPHA * per_row.mean()).backward()
    grads = {n: p.grad.detach().clone() for n, p in policy.named_parameters()}
    policy.zero_grad(set_to_none=True)
    return grads, per_row.detach()


@pytest.mark.parametrize("in_batch", [True, False], ids=["in_batch", "own_group"])
@pytest.mark.parametrize("share_prompt", [True, False], ids=["shared_prompt", "full_seq"])
def test_update_gradient_is_ppo_plus_alpha_joint(setup, share_prompt, in_batch):
    policy, ro, adv, weight, query, negatives = setup
    kw = dict(loss_type="dapo", share_prompt=share_prompt)
    ppo, _ = update_grads(policy, ro, adv, weight, None, **kw)
    zero, _ = update_grads(policy, ro, adv, weight, targets(ro, query, negatives, 0.0), **kw)
    joint_only, per_row = joint_grads_alone(policy, ro, query, negatives, in_batch)
    joint = targets(ro, query, negatives, in_batch=in_batch)
    both, metrics = update_grads(policy, ro, adv, weight, joint, **kw)
    # the two parts are both sizeable, so a missing or doubled one cannot pass
    for part in (ppo, joint_only):
        assert max(float(g.abs().max()) for g in part.values()) > 1e-4
    for name in ppo:
        torch.testing.assert_close(zero[name], ppo[name], atol=0, rtol=0)  # alpha 0 = the paper
        # fp32: the two sides differ only in summation order (one forward vs two)
        want = ppo[name] + joint_only[name]
        torch.testing.assert_close(both[name], want, atol=1e-6, rtol=1e-4, msg=name)
    # metrics: the per-row mean of the loss (all rows, the masked one included) and top-1
    assert metrics["joint/infonce"] == pytest.approx(float(per_row.mean()), rel=1e-5)
    assert 0.0 <= metrics["joint/acc"] <= 1.0


@pytest.mark.parametrize(
    "split", [{"micro_batch_size": 2}, {"max_tokens_per_micro_batch": 26}], ids=["rows", "tokens"]
)
def test_micro_batched_joint_update_equals_unsplit(setup, split):
    policy, ro, adv, weight, query, negatives = setup
    joint = targets(ro, query, negatives)
    whole, m_whole = update_grads(policy, ro, adv, weight, joint)
    got, m_split = update_grads(policy, ro, adv, weight, joint, **split)
    for name, g in whole.items():
        torch.testing.assert_close(got[name], g, atol=1e-6, rtol=1e-4, msg=f"{split} {name}")
    for name in ("joint/infonce", "joint/acc"):
        assert m_split[name] == pytest.approx(m_whole[name], rel=1e-5)


def own_vs_others(policy, ro, query) -> torch.Tensor:
    """(N,) cos(x_r, q_own) - mean_{g != own} cos(x_r, q_g), from a fresh no-grad loss pass."""
    with torch.no_grad():
        _, _, pooled = rows_logprobs_and_embedding(policy, ro, torch.arange(P * K), SYSTEM_LEN)
    cos = F.normalize(pooled, dim=-1) @ F.normalize(query, dim=-1).T  # (N, P)
    own = F.one_hot(ro.row_to_prompt, P).bool()  # (N, P)
    return cos[own] - cos.masked_fill(own, 0.0).sum(-1) / (P - 1)


def test_one_sgd_step_on_the_joint_loss_pulls_each_rollout_to_its_own_query(setup):
    """Zero advantages (no policy gradient): one SGD step of the update moves every rollout's
    pooled embedding (recomputed after the step) towards its own query, away from the others.

    Each group's "query" is the NEXT group's mean rollout embedding, so every rollout starts
    nearest a wrong query (what a text-independent rationale looks like). With random queries
    rows already nearest their own get almost no gradient (InfoNCE weights hard rows) and one
    of them can move by ~0 either way: a real property, not what this test is about.
    """
    base, ro, _, _, _, _ = setup
    policy = copy.deepcopy(base)
    with torch.no_grad():
        _, _, pooled = rows_logprobs_and_embedding(policy, ro, torch.arange(P * K), SYSTEM_LEN)
    query = pooled.view(P, K, -1).mean(1).roll(1, dims=0)  # (P, D) group i -> group i-1's mean
    before = own_vs_others(policy, ro, query)
    assert (before < 0).all(), before  # the setup: every rollout nearer another group's query
    opt = torch.optim.SGD(policy.parameters(), lr=1e-3)  # grad norm ~50: a small step
    cfg = UpdateConfig(
        num_generations=K, prompts_per_minibatch=P, max_completion_length=R, grad_clip=None
    )
    hooks = UpdateHooks(zero_grad=lambda: opt.zero_grad(set_to_none=True), step=opt.step)
    joint = targets(ro, query, None, weight=1.0)
    zeros = torch.zeros(P * K)
    metrics = PolicyUpdater(cfg, policy, hooks).update(ro, zeros, torch.ones(P * K), joint=joint)
    assert metrics["update_skipped"] == 0.0 and metrics["grad_norm"] > 0
    after = own_vs_others(policy, ro, query)
    # measured here: gains 0.30-0.58 per row (tiny backbone, fp32)
    assert (after - before > 0.05).all(), f"own-vs-others cosine margin: {before} -> {after}"


# ----------------------------------------------------------------------------- config + run


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("algo.contrastive_weight=-0.5", "algo.contrastive_weight=-0.5"),
        ("algo.contrastive_tau=0", "algo.contrastive_tau=0"),
        ("algo.contrastive_tau=abc", "converted to Float\n *full_key: algo.contrastive_tau"),
        (
            "algo.contrastive_in_batch=maybe",
            "not a valid bool.*\n *full_key: algo.contrastive_in_batch",
        ),
    ],
)
def test_bad_joint_config_fails_at_startup(override, message, tmp_path):
    # a wrong type fails while composing (algo is a typed group, grace_lightning/schema.py;
    # Hydra names full_key), a value out of range in validate: both before any model loads
    with pytest.raises((ConfigCompositionException, ConfigError)) as err:
        validate(make_cfg([override], tmp_path))
    assert re.search(message, f"{err.value} {err.value.__cause__}")


def test_the_paper_default_is_off(tmp_path):
    cfg = make_cfg([], tmp_path)
    assert cfg.algo.contrastive_weight == 0.0
    assert cfg.algo.contrastive_tau == 0.05 and cfg.algo.contrastive_in_batch is True


@pytest.mark.parametrize("reward", ["sup", "unsup"])
def test_tiny_run_with_the_joint_loss_logs_it_and_collapse_metrics(reward, tmp_path):
    from grace_lightning.train import train

    cfg = make_cfg(
        [*TINY, f"reward={reward}", "callbacks=none", "algo.contrastive_weight=0.5"], tmp_path
    )
    train(cfg)
    rows = [r for r in metric_rows(tmp_path) if r.get("joint/infonce")]
    assert rows, "joint/infonce was never logged"
    for r in rows:
        for name in ("joint/infonce", "joint/acc", "loss", "grad_norm"):
            assert math.isfinite(float(r[name])), (name, r[name])
        assert float(r["joint/infonce"]) > 0  # a cross-entropy over > 1 candidate
        assert 0.0 <= float(r["joint/acc"]) <= 1.0
        for name in (
            "collapse/distinct_2",
            "collapse/distinct_3",
            "collapse/cross_group_duplicate",
            "collapse/cross_group_cosine",
            "collapse/within_group_cosine",
        ):
            assert math.isfinite(float(r[name])), (name, r[name])
        assert 0.0 < float(r["collapse/distinct_2"]) <= 1.0
