"""Hand-checked GRACE rewards on 2-D unit vectors e(a) = (cos a, sin a), a in degrees.

cos(e(a), e(b)) = cos(a - b), so with angles on a 60-degree grid every similarity is one of
1, 0.5, -0.5, -1 (and 0 for 90 degrees).
"""

from __future__ import annotations

import math

import pytest
import torch

from grace_lightning.rl.advantages import group_advantages, zero_std_groups
from grace_lightning.rl.rewards import (
    apply_truncation,
    group_std,
    infonce_rewards,
    supervised_rewards,
    unsupervised_rewards,
)


def e(*angles) -> torch.Tensor:
    """Unit vectors at the given angles (degrees), shape (*, 2), float64."""
    a = torch.tensor(angles, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=-1)


def close(actual, expected):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype))


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


# Shared supervised example, B=2 groups, K=3 rollouts, M=1 negative.
#   group 0: q = 0,   d+ = [0, 60, 120],   d- = [120]
#   group 1: q = 180, d+ = [180, 120, 240], d- = [240]
Q = e(0, 180)  # (2, 2)
P = torch.stack([e(0, 60, 120), e(180, 120, 240)])  # (2, 3, 2)
N = torch.stack([e(120), e(240)])  # (2, 1, 2)


def test_supervised_paper_terms_and_total():
    r = supervised_rewards(Q, P, N, lambda_consistency=0.2, lambda_hard=0.2, tau=0.1)
    # pos: g0 cos(0-0), cos(0-60), cos(0-120) = 1, .5, -.5; g1 cos(0), cos(60), cos(-60)
    close(r["pos"], [[1, 0.5, -0.5], [1, 0.5, 0.5]])
    # neg: g0 -cos(0-120) = .5; g1 -cos(180-240) = -.5 (same for every k)
    close(r["neg"], [[0.5] * 3, [-0.5] * 3])
    # consistency, pairs g0: (0,60)=.5 (0,120)=-.5 (60,120)=.5 -> k0 (.5-.5)/2=0, k1 .5, k2 0
    #                    g1: (180,120)=.5 (180,240)=.5 (120,240)=-.5 -> k0 .5, k1 0, k2 0
    close(r["consistency"], [[0, 0.5, 0], [0.5, 0, 0]])
    # hard: i=0: max cos(0, [180,120,240]) = max(-1,-.5,-.5) = -.5 -> +.5
    #       i=1: max cos(180, [0,60,120])  = max(-1,-.5,.5)  = .5  -> -.5
    close(r["hard"], [[0.5] * 3, [-0.5] * 3])
    # total = (pos + neg + .2 cons + .2 hard) / .1
    #   g0: (1+.5+0+.1, .5+.5+.1+.1, -.5+.5+0+.1) / .1 = (16, 12, 1)
    #   g1: (1-.5+.1-.1, .5-.5+0-.1, .5-.5+0-.1) / .1 = (5, -1, -1)
    close(r["total"], [[16, 12, 1], [5, -1, -1]])


def test_supervised_per_rollout_variants():
    r = supervised_rewards(Q, P, N, negative_mode="per_rollout", hard_mode="per_rollout")
    # neg: -cos(d+_k, d-): g0 -cos(0-120)=.5, -cos(60-120)=-.5, -cos(0)=-1
    #                      g1 -cos(180-240)=-.5, -cos(120-240)=.5, -cos(0)=-1
    close(r["neg"], [[0.5, -0.5, -1], [-0.5, 0.5, -1]])
    # hard: -max_j cos(d+_ik, d+_gj), g != i
    #   (0,0)=0:   vs 180,120,240 -> -1,-.5,-.5 -> max -.5 -> .5
    #   (0,1)=60:  vs 180,120,240 -> -.5,.5,-1  -> max .5  -> -.5
    #   (0,2)=120: vs 180,120,240 -> .5,1,-.5   -> max 1   -> -1
    #   (1,0)=180: vs 0,60,120    -> -1,-.5,.5  -> max .5  -> -.5
    #   (1,1)=120: vs 0,60,120    -> -.5,.5,1   -> max 1   -> -1
    #   (1,2)=240: vs 0,60,120    -> -.5,-1,-.5 -> max -.5 -> .5
    close(r["hard"], [[0.5, -0.5, -1], [-0.5, -1, 0.5]])
    # total g0 k0: (1 + .5 + .2*0 + .2*.5) / .1 = 16
    close(r["total"][0, 0], 16.0)


def test_supervised_several_negatives_none_and_single_group():
    q = e(0)  # (1, 2)
    p = e(0, 90)[None]  # (1, 2, 2)
    # neg = -(cos(0-60) + cos(0-90)) = -(.5 + 0) = -.5
    r = supervised_rewards(q, p, e(60, 90)[None])
    close(r["neg"], [[-0.5, -0.5]])
    # B == 1: no other groups -> hard = 0; no negatives -> neg = 0
    r = supervised_rewards(q, p, None, tau=1.0)
    close(r["neg"], [[0.0, 0.0]])
    close(r["hard"], [[0.0, 0.0]])
    # consistency (K=2) = cos(0-90) = 0; total = pos = (1, 0)
    close(r["total"], [[1.0, 0.0]])


def test_hard_is_mean_over_other_groups_and_consistency_zero_for_k1():
    # B=3, K=1: q = d+ = [0], [90], [180]
    q = e(0, 90, 180)
    p = q[:, None]
    r = supervised_rewards(q, p, None)
    # i=0: others cos(0-90)=0, cos(0-180)=-1 -> mean -.5 -> hard .5
    # i=1: cos(90-0)=0, cos(90-180)=0 -> 0;  i=2: -1, 0 -> .5
    close(r["hard"], [[0.5], [0.0], [0.5]])
    close(r["consistency"], [[0.0], [0.0], [0.0]])


def test_infonce_hand_values():
    # g0: q=0,  d+ = [0, 90],  d- = [180];  g1: q=90, d+ = [90, 0], d- = [270]
    q = e(0, 90)
    p = torch.stack([e(0, 90), e(90, 0)])
    n = torch.stack([e(180), e(270)])
    r = infonce_rewards(q, p, n, tau=0.5)
    # (0,0): candidates {d+_00=0, d-_0=180, d+_10=90}: cos to q0 = 1, -1, 0
    #   -> 1/.5 - log(e^2 + e^-2 + e^0) = 2 - L,  L = log(8.5244) = 2.1429
    # (0,1): {d+_01=90, d-_0=180, d+_11=0}: cos = 0, -1, 1 -> 0 - L
    # group 1 mirrors group 0 (cos to q1=90 of 90, 270, 0 = 1, -1, 0 and of 0, 270, 90 = 0,-1,1)
    L = math.log(math.exp(2) + math.exp(-2) + 1)
    close(r["infonce"], [[2 - L, -L], [2 - L, -L]])
    close(r["total"], r["infonce"])
    # no negatives, B=1: the only candidate is the positive -> log 1 = 0
    close(infonce_rewards(e(0), e(0, 90)[None], None, tau=0.1)["total"], [[0.0, 0.0]])


def test_infonce_zero_padded_negatives_are_not_candidates():
    # g0 has one real negative (180) and one zero-vector pad; g1 has two real negatives
    # (as module._pad_negatives builds them). B=2, K=1, tau=1.
    q = e(0, 90)
    p = torch.stack([e(0), e(90)])  # (2, 1, 2): each positive equals its query
    n = torch.stack([torch.cat([e(180), torch.zeros(1, 2, dtype=torch.float64)]), e(270, 180)])
    r = infonce_rewards(q, p, n, tau=1.0)["infonce"]
    # g0 candidates: d+_0 (cos 1), d-_0 = 180 (cos -1), d+_1 = 90 (cos 0); NOT the pad (cos 0)
    #   -> 1 - log(e + e^-1 + 1) = -0.4338   (counting the pad: 1 - log(e + e^-1 + 2) = -0.7436)
    # g1 candidates: d+_1 (1), 270 (-1), 180 (0), d+_0 = 0 (0) -> 1 - log(e + e^-1 + 2)
    close(r, [[1 - math.log(math.e + 1 / math.e + 1)], [1 - math.log(math.e + 1 / math.e + 2)]])
    # a group whose negatives are all padding is the same as no negatives at all
    only_pad = infonce_rewards(e(0), e(0)[None], torch.zeros(1, 3, 2).double(), tau=1.0)["infonce"]
    close(only_pad, [[0.0]])


def test_unsupervised_hand_values():
    # g0: anchor 0,   x = [0, 60];  g1: anchor 180, x = [120, 240]
    a = e(0, 180)
    x = torch.stack([e(0, 60), e(120, 240)])
    r = unsupervised_rewards(a, x, lambda_consistency=0.2, lambda_hard=0.2, tau=0.1)
    # self: g0 cos(0), cos(60) = 1, .5; g1 cos(60), cos(-60) = .5, .5
    close(r["self"], [[1, 0.5], [0.5, 0.5]])
    # consistency: g0 cos(0-60) = .5; g1 cos(120-240) = -.5
    close(r["consistency"], [[0.5, 0.5], [-0.5, -0.5]])
    # paper hard: i=0 max cos(0, [120,240]) = -.5 -> .5; i=1 max cos(180, [0,60]) = -.5 -> .5
    close(r["hard"], [[0.5, 0.5], [0.5, 0.5]])
    # total g0 (1+.1+.1, .5+.1+.1)/.1 = (12, 7); g1 (.5-.1+.1)/.1 = 5
    close(r["total"], [[12, 7], [5, 5]])

    r = unsupervised_rewards(a, x, cross_group="upstream")
    # upstream hard = -cos(x_ik, anchor_g), g != i:
    #   g0: -cos(0-180) = 1, -cos(60-180) = .5;  g1: -cos(120-0) = .5, -cos(240-0) = .5
    close(r["hard"], [[1, 0.5], [0.5, 0.5]])
    # total g0 (1 + .1 + .2, .5 + .1 + .1)/.1 = (13, 7); g1 5
    close(r["total"], [[13, 7], [5, 5]])


def test_issue4_paper_neg_and_hard_cancel_under_group_centering():
    """Upstream issue #4: q and d- are sampled once per group, so the paper's `neg` and `hard`
    are constant within a group and their group-centred advantage is exactly zero. Only pos and
    consistency (and the truncation replacement) move the policy. The per-rollout and InfoNCE
    variants keep a within-group spread."""
    g = torch.Generator().manual_seed(0)
    B, K, M, D = 4, 8, 2, 16
    q = _unit(torch.randn(B, D, generator=g, dtype=torch.float64))
    p = _unit(torch.randn(B, K, D, generator=g, dtype=torch.float64))
    n = _unit(torch.randn(B, M, D, generator=g, dtype=torch.float64))

    paper = supervised_rewards(q, p, n)
    for term in ("neg", "hard"):
        assert zero_std_groups(paper[term]).all()
        close(group_std(paper[term]), torch.zeros(B))
        close(group_advantages(paper[term]), torch.zeros(B, K))
    # hence total advantages do not depend on negatives or lambda_hard at all
    no_neg = supervised_rewards(q, p, None, lambda_hard=0.0)
    close(group_advantages(paper["total"]), group_advantages(no_neg["total"]))
    # ... except through the -1 truncation replacement, which shifts one rollout's gap
    trunc = torch.zeros(B, K, dtype=torch.bool)
    trunc[:, 0] = True
    a1 = group_advantages(apply_truncation(paper["total"], trunc)[0])
    a2 = group_advantages(apply_truncation(no_neg["total"], trunc)[0])
    assert not torch.allclose(a1, a2)

    variants = supervised_rewards(q, p, n, negative_mode="per_rollout", hard_mode="per_rollout")
    for term in ("neg", "hard"):
        assert (group_std(variants[term]) > 1e-3).all()
        assert group_advantages(variants[term]).abs().max() > 1e-3
    assert (group_std(infonce_rewards(q, p, n, tau=0.1)["infonce"]) > 1e-3).all()
    # unsupervised: paper cross-group is also constant in a group; upstream's varies with k
    assert zero_std_groups(unsupervised_rewards(q, p)["hard"]).all()
    assert (group_std(unsupervised_rewards(q, p, cross_group="upstream")["hard"]) > 1e-3).all()


def test_apply_truncation_modes():
    r = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    t = torch.tensor([[False, True, False], [True, True, True]])

    out, w = apply_truncation(r, t, mode="replace")
    close(out, [[1, -1, 3], [-1, -1, -1]])
    close(w, torch.ones(2, 3))

    out, w = apply_truncation(r, t, mode="mask")
    assert torch.isnan(out[t]).all()
    close(out[~t], [1.0, 3.0])
    close(w, [[1, 0, 1], [0, 0, 0]])
    # masked rollouts are left out of the group mean: g0 mean(1, 3) = 2 -> (-1, 0, 1);
    # a fully masked group gets zero advantages
    close(group_advantages(out), [[-1, 0, 1], [0, 0, 0]])

    out, w = apply_truncation(r, t, mode="off")
    close(out, r)
    close(w, torch.ones(2, 3))

    with pytest.raises(ValueError):
        apply_truncation(r, t, mode="drop")


def test_group_std_is_unbiased_and_nan_aware():
    # [1, 2, 3]: mean 2, squared deviations 1 + 0 + 1 = 2, unbiased 2/(3-1) = 1 -> 1
    # [1, nan, 3]: mean 2, 2/(2-1) = 2 -> sqrt 2;  [7] (K=1): 0
    close(group_std(torch.tensor([[1.0, 2.0, 3.0], [1.0, float("nan"), 3.0]])), [1, math.sqrt(2)])
    close(group_std(torch.tensor([[7.0]])), [0.0])
    x = torch.randn(5, 4)
    close(group_std(x), x.std(dim=1))


def test_half_precision_embeddings_give_float32_rewards():
    r = supervised_rewards(Q.bfloat16(), P.bfloat16(), N.bfloat16())
    assert r["total"].dtype == torch.float32
    # bf16 rounds sin(60) = .866 by ~2e-3, i.e. ~2e-2 after / tau
    expected = torch.tensor([[16.0, 12, 1], [5, -1, -1]])
    torch.testing.assert_close(r["total"], expected, atol=0.1, rtol=0)


# ----------------------------------------------------------------------------- fp32 under autocast


def _tight_groups(seed=0, B=4, K=8, D=64, spread=0.15):
    """Unit embeddings whose within-group cosine is ~0.98 (float32)."""
    g = torch.Generator().manual_seed(seed)
    centre = _unit(torch.randn(B, 1, D, generator=g))
    rollouts = _unit(centre + spread * torch.randn(B, K, D, generator=g) / D**0.5)
    query = _unit(centre[:, 0] + 0.5 * torch.randn(B, D, generator=g) / D**0.5)
    negatives = _unit(torch.randn(B, 2, D, generator=g))
    return query, rollouts, negatives


REWARD_FNS = {
    "supervised": lambda f, q, p, n: f(q, p, n),
    "supervised_per_rollout": lambda f, q, p, n: f(
        q, p, n, negative_mode="per_rollout", hard_mode="per_rollout"
    ),
    "unsupervised": lambda f, q, p, n: f(q, p),
    "unsupervised_upstream": lambda f, q, p, n: f(q, p, cross_group="upstream"),
    "infonce": lambda f, q, p, n: f(q, p, n, tau=0.1),
}
FN_OF = {
    "supervised": supervised_rewards,
    "supervised_per_rollout": supervised_rewards,
    "unsupervised": unsupervised_rewards,
    "unsupervised_upstream": unsupervised_rewards,
    "infonce": infonce_rewards,
}


@pytest.mark.parametrize("name", list(REWARD_FNS))
def test_rewards_and_advantages_are_fp32_under_bf16_autocast(name):
    q, p, n = _tight_groups()
    assert (p @ p.transpose(1, 2)).mean() > 0.97  # tight groups: small within-group differences
    call, fn = REWARD_FNS[name], FN_OF[name]
    ref = call(fn, q, p, n)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = call(fn, q, p, n)
        adv = group_advantages(ours["total"])
        naive = call(fn.__wrapped__, q, p, n)["total"]  # the same code with autocast left on
    for key in ref:
        assert ours[key].dtype == torch.float32, key
        torch.testing.assert_close(ours[key], ref[key], atol=1e-6, rtol=0)
    a_ref = group_advantages(ref["total"])
    torch.testing.assert_close(adv, a_ref, atol=1e-6, rtol=0)
    # the check can fail: without autocast off the einsums run in bf16
    assert naive.dtype == torch.bfloat16
    if name.startswith("supervised"):
        a_naive = group_advantages(naive.float())
        err = (a_naive - a_ref).abs().max()
        assert err > 0.2 * a_ref.abs().mean(), (float(err), float(a_ref.abs().mean()))
        assert (a_naive.sign() != a_ref.sign()).sum() >= 1
    else:
        assert (naive.float() - ref["total"]).abs().max() > 1e-3
