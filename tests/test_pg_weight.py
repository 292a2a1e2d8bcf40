"""algo.pg_weight (the policy-gradient term's weight; 0 = the joint loss alone) and the per-term
gradient norms grad_norm/pg, grad_norm/joint (algo.log_term_grad_norms_steps), issue 19."""

from __future__ import annotations

import math
import re
from contextlib import nullcontext

import pytest
import torch
from hydra.errors import ConfigCompositionException

from grace_lightning.config import ConfigError, validate
from grace_lightning.rl.update import PolicyUpdater, UpdateConfig, UpdateHooks

from .test_joint_wiring import joint_grads_alone, setup, targets, update_grads  # noqa: F401
from .test_train import TINY, make_cfg, metric_rows
from .test_update import K, P, R


def _norm(grads: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))


def _big(grads: dict[str, torch.Tensor]) -> float:
    return max(float(g.abs().max()) for g in grads.values())


def test_pg_weight_zero_is_the_joint_gradient_alone(setup):  # noqa: F811
    """pg_weight=0 changes a joint run's gradient, to exactly the joint term's gradient."""
    policy, ro, adv, weight, query, negatives = setup
    joint = targets(ro, query, negatives)
    both, _ = update_grads(policy, ro, adv, weight, joint)  # pg_weight 1 (default)
    zero, _ = update_grads(policy, ro, adv, weight, joint, pg_weight=0.0)
    joint_only, _ = joint_grads_alone(policy, ro, query, negatives)
    ppo, _ = update_grads(policy, ro, adv, weight, None)
    assert _big(ppo) > 1e-4  # the pg part is sizeable: dropping it must show
    diff = max(float((both[n] - zero[n]).abs().max()) for n in both)
    assert diff > 1e-4, "pg_weight=0 left the joint run's gradient unchanged"
    for name in zero:
        torch.testing.assert_close(zero[name], joint_only[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("w", [0.25, 2.5])
def test_pg_weight_scales_the_policy_gradient_part(setup, w):  # noqa: F811
    policy, ro, adv, weight, query, negatives = setup
    joint = targets(ro, query, negatives)
    ppo, _ = update_grads(policy, ro, adv, weight, None)  # pg_weight 1, no joint term
    joint_only, _ = joint_grads_alone(policy, ro, query, negatives)
    got, _ = update_grads(policy, ro, adv, weight, joint, pg_weight=w)
    for name in got:
        want = w * ppo[name] + joint_only[name]
        torch.testing.assert_close(got[name], want, atol=1e-6, rtol=1e-4, msg=name)
    alone, _ = update_grads(policy, ro, adv, weight, None, pg_weight=w)
    for name in alone:
        torch.testing.assert_close(alone[name], w * ppo[name], atol=1e-7, rtol=1e-5, msg=name)


@pytest.mark.parametrize("pg_weight", [1.0, 0.0, 2.0])
@pytest.mark.parametrize("split", [{}, {"micro_batch_size": 2}], ids=["whole", "micro"])
def test_term_grad_norms_match_a_hand_computation(setup, pg_weight, split):  # noqa: F811
    """grad_norm/pg = ||grad(pg_weight * PPO)||, grad_norm/joint = ||grad(alpha * InfoNCE)||,
    summed over micro-batches; logging them leaves the step's own gradient unchanged."""
    policy, ro, adv, weight, query, negatives = setup
    joint = targets(ro, query, negatives)
    ppo, _ = update_grads(policy, ro, adv, weight, None)
    joint_only, _ = joint_grads_alone(policy, ro, query, negatives)
    kw = dict(pg_weight=pg_weight, **split)
    plain, m_plain = update_grads(policy, ro, adv, weight, joint, **kw)
    got, m = update_grads(policy, ro, adv, weight, joint, log_term_grad_norms_steps=8, **kw)
    assert "grad_norm/pg" not in m_plain and "grad_norm/joint" not in m_plain  # off by default
    assert m["grad_norm/pg"] == pytest.approx(pg_weight * _norm(ppo), rel=1e-4, abs=1e-7)
    assert m["grad_norm/joint"] == pytest.approx(_norm(joint_only), rel=1e-4)
    assert m["grad_norm/joint"] > 0.0
    for name in plain:
        torch.testing.assert_close(got[name], plain[name], atol=1e-7, rtol=1e-5, msg=name)
    assert m["grad_norm"] == pytest.approx(m_plain["grad_norm"], rel=1e-5)


def test_term_grad_norms_only_on_the_first_steps(setup):  # noqa: F811
    """P optimiser steps per update (one group per mini-batch), N = 5: starting at step 4 only
    the first is measured (the metric is its value alone), at step 3 the first two, from step
    5 on none."""
    policy, ro, adv, weight, query, negatives = setup
    joint = targets(ro, query, negatives)

    def run(first_step):
        cfg = UpdateConfig(
            num_generations=K,
            prompts_per_minibatch=1,
            max_completion_length=R,
            grad_clip=None,
            log_term_grad_norms_steps=5,
        )
        hooks = UpdateHooks(zero_grad=lambda: policy.zero_grad(set_to_none=True), step=lambda: None)
        up = PolicyUpdater(
            cfg, policy, hooks, reference=lambda: nullcontext(), first_step=first_step
        )
        return up.update(ro, adv, weight, joint=joint)

    assert P >= 2
    two = run(3)  # steps 3 and 4 < 5 measured, 5 not
    first = run(4)  # step 4 measured, 5 and 6 not
    none = run(5)
    assert "grad_norm/pg" not in none and "grad_norm/joint" not in none
    assert first["grad_norm/pg"] > 0 and two["grad_norm/pg"] > 0
    # the first mini-batch's norm alone differs from the mean over the first two
    assert first["grad_norm/joint"] != pytest.approx(two["grad_norm/joint"], rel=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algo.pg_weight=-1"], "algo.pg_weight=-1"),
        (["algo.pg_weight=abc"], "could not be converted to Float\n *full_key: algo.pg_weight"),
        (["algo.pg_weight=0"], "algo.pg_weight=0 with algo.contrastive_weight=0"),
        (["algo.log_term_grad_norms_steps=-1"], "algo.log_term_grad_norms_steps=-1"),
    ],
)
def test_bad_pg_weight_config_fails_at_startup(overrides, message, tmp_path):
    # a wrong type fails while composing (algo is a typed group, grace_lightning/schema.py;
    # Hydra names full_key), a value out of range in validate: both before any model loads
    with pytest.raises((ConfigCompositionException, ConfigError)) as err:
        validate(make_cfg(overrides, tmp_path))
    assert re.search(message, f"{err.value} {err.value.__cause__}")


def test_defaults_are_grace(tmp_path):
    cfg = make_cfg([], tmp_path)
    assert cfg.algo.pg_weight == 1.0 and cfg.algo.log_term_grad_norms_steps == 8
    validate(make_cfg(["algo.pg_weight=0", "algo.contrastive_weight=0.5"], tmp_path))


def test_tiny_joint_only_run_logs_the_term_norms_on_its_first_steps(tmp_path):
    from grace_lightning.train import train

    cfg = make_cfg(
        [
            *TINY,
            "callbacks=none",
            "algo.contrastive_weight=0.5",
            "algo.pg_weight=0",
            "algo.log_term_grad_norms_steps=2",  # the first rollout batch's 2 steps
            "trainer.max_steps=4",  # 2 rollout batches of 2 optimiser steps, one row each
        ],
        tmp_path,
    )
    train(cfg)
    rows = metric_rows(tmp_path)
    norms = [r for r in rows if r.get("grad_norm/joint")]
    assert len(norms) == 1, norms  # the first rollout batch's two steps, once
    assert float(norms[0]["grad_norm/pg"]) == 0.0  # pg_weight=0: no policy-gradient term
    assert float(norms[0]["grad_norm/joint"]) > 0.0
    steps = [r for r in rows if r.get("grad_norm")]
    assert len(steps) == 2, steps  # the run logged two rollout batches; the norms only once
