"""Hand-checked policy losses, clip metrics, KL, and chunked log-prob / entropy."""

from __future__ import annotations

import math

import pytest
import torch

from grace_lightning.rl.losses import (
    clipped_policy_loss,
    entropy_from_logits,
    kl_k3,
    masked_mean,
    selective_log_softmax,
)


def close(actual, expected, **kw):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), **kw)


# ----------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("chunk_rows", [1, 4, 1024])
def test_selective_log_softmax_matches_naive_values_and_grads(chunk_rows):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    w = torch.randn(2, 5, generator=g, dtype=torch.float64)

    naive = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    (grad_naive,) = torch.autograd.grad((naive * w).sum(), logits)
    ours = selective_log_softmax(logits, ids, chunk_rows=chunk_rows)
    (grad_ours,) = torch.autograd.grad((ours * w).sum(), logits)

    assert ours.shape == (2, 5)
    close(ours, naive)
    close(grad_ours, grad_naive)


def test_selective_log_softmax_half_precision_upcasts():
    logits = torch.randn(3, 7).bfloat16()
    ids = torch.tensor([0, 3, 6])
    out = selective_log_softmax(logits, ids)
    assert out.dtype == torch.float32
    expected = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, None]).squeeze(-1)
    close(out, expected)


@pytest.mark.parametrize("chunk_rows", [1, 3, 1024])
def test_entropy_matches_naive_values_and_grads(chunk_rows):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(logits, -1)
    naive = -(logp.exp() * logp).sum(-1)
    (grad_naive,) = torch.autograd.grad(naive.sum(), logits)
    ours = entropy_from_logits(logits, chunk_rows=chunk_rows)
    (grad_ours,) = torch.autograd.grad(ours.sum(), logits)
    close(ours, naive)
    close(grad_ours, grad_naive)


def test_entropy_hand_values():
    # uniform over V=4 -> log 4; one-hot (huge logit gap) -> 0
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    close(entropy_from_logits(logits), [math.log(4), 0.0], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- KL, masked mean


def test_kl_k3():
    x = torch.randn(2, 3)
    close(kl_k3(x, x), torch.zeros(2, 3))
    ln2 = math.log(2)
    # ref - logp = ln 2:  2 - ln 2 - 1 = 0.30685;  ref - logp = -ln 2: 0.5 + ln 2 - 1 = 0.19315
    logp = torch.tensor([[0.0, ln2]])
    ref = torch.tensor([[ln2, 0.0]])
    close(kl_k3(logp, ref), [[1 - ln2, ln2 - 0.5]])
    assert (kl_k3(torch.randn(50), torch.randn(50)) >= 0).all()


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    m = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    close(masked_mean(x, m), 8 / 3)  # (1 + 3 + 4) / 3
    close(masked_mean(x, m, dim=1), [1.0, 3.5])
    close(masked_mean(x, torch.zeros(2, 2)), 0.0)


# ----------------------------------------------------------------------------- PPO-clip
# Hand-made ratios r = exp(logp - old_logp) with old_logp = 0, eps = 0.2, dual clip c = 3.
#   seq 0, A = +1, r = [1.0, 1.5, 0.5, 2.0], mask [1, 1, 1, 0]
#     loss = max(-A r, -A clip(r)) = [max(-1,-1), max(-1.5,-1.2), max(-.5,-.8), masked]
#          = [-1, -1.2 (high clip), -0.5 (no clip: unclipped term is pessimistic), -]
#   seq 1, A = -1, r = [0.5, 1.5, 4.0, 2.0], mask [1, 1, 1, 1]
#     max(r, clip(r)) = [0.8 (low clip), 1.5, 4.0, 2.0]; dual: min(., 3) = [0.8, 1.5, 3.0, 2.0]
#   active tokens 7; sum = (-1 - 1.2 - 0.5) + (0.8 + 1.5 + 3 + 2) = -2.7 + 7.3 = 4.6
RATIOS = torch.tensor([[1.0, 1.5, 0.5, 2.0], [0.5, 1.5, 4.0, 2.0]], dtype=torch.float64)
LOGP = RATIOS.log()
OLD = torch.zeros_like(LOGP)
ADV = torch.tensor([1.0, -1.0], dtype=torch.float64)
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)


@pytest.mark.parametrize(
    "loss_type, kwargs, expected",
    [
        ("dapo", {}, 4.6 / 7),  # sum / active tokens (default num_items)
        ("dapo", {"num_items": 10}, 4.6 / 10),  # sum / global active tokens
        ("bnpo", {}, 4.6 / 7),  # sum / active tokens in this batch
        ("grpo", {}, (-2.7 / 3 + 7.3 / 4) / 2),  # per-seq means -0.9 and 1.825 -> 0.4625
        ("dr_grpo", {"max_completion_length": 5}, 4.6 / (2 * 5)),
        ("dr_grpo", {}, 4.6 / (2 * 4)),  # defaults to the padded width T = 4
    ],
)
def test_clipped_loss_aggregation(loss_type, kwargs, expected):
    loss, _ = clipped_policy_loss(LOGP, OLD, ADV, MASK, loss_type=loss_type, **kwargs)
    close(loss, expected)


def test_clip_metrics_and_dual_clip():
    loss, m = clipped_policy_loss(LOGP, OLD, ADV, MASK)
    # low: seq1 tok0 (r=.5 < .8, A<0); high: seq0 tok1 (r=1.5 > 1.2, A>0); the masked seq0 tok3
    # (r=2, A>0) is not counted; dual: seq1 tok2 (A<0, r=4 > c=3). Fractions of 7 tokens.
    close(m["clip_ratio/low_mean"], 1 / 7)
    close(m["clip_ratio/high_mean"], 1 / 7)
    close(m["clip_ratio/region_mean"], 2 / 7)
    close(m["clip_ratio/dual_clip_mean"], 1 / 7)

    # without dual clip seq1 tok2 costs 4.0 instead of 3.0: sum 5.6, / 7 = 0.8
    loss, m = clipped_policy_loss(LOGP, OLD, ADV, MASK, dual_clip=None)
    close(loss, 5.6 / 7)
    close(m["clip_ratio/dual_clip_mean"], 0.0)
    with pytest.raises(ValueError):
        clipped_policy_loss(LOGP, OLD, ADV, MASK, dual_clip=0.5)


def test_clip_higher():
    # eps_high = .28: seq0 tok1 now -min(1.5, 1.28) = -1.28 -> sum 4.6 - 0.08 = 4.52
    loss, m = clipped_policy_loss(LOGP, OLD, ADV, MASK, epsilon_high=0.28)
    close(loss, 4.52 / 7)
    close(m["clip_ratio/high_mean"], 1 / 7)
    loss, m = clipped_policy_loss(LOGP, OLD, ADV, MASK, epsilon_high=0.6)  # 1.5 < 1.6: no clip
    close(loss, 4.3 / 7)
    close(m["clip_ratio/high_mean"], 0.0)


def test_on_policy_gradient_is_advantage_weighted_log_likelihood():
    # at r = 1 the surrogate's gradient w.r.t. logp is -A * mask / normaliser (REINFORCE)
    logp = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    loss, m = clipped_policy_loss(logp, logp.detach(), ADV, MASK, loss_type="dapo")
    (grad,) = torch.autograd.grad(loss, logp)
    close(grad, -ADV[:, None] * MASK / 7)
    close(m["clip_ratio/region_mean"], 0.0)
    with pytest.raises(ValueError):
        clipped_policy_loss(LOGP, OLD, ADV, MASK, loss_type="sapo")


# ----------------------------------------------------------------------------- safe maths, fp32


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "grpo", "dr_grpo"])
@pytest.mark.parametrize(
    "num_items", [None, 0, 0.0, torch.tensor(0.0), torch.tensor(0, dtype=torch.long)]
)
def test_zero_active_tokens_give_zero_loss_and_zero_grad(loss_type, num_items):
    # a mini-batch with no active token anywhere (DAPO dynamic sampling, truncation=mask):
    # the global token count is 0; the loss must be 0 with a zero gradient, not NaN
    logp = (LOGP * 0.9).clone().requires_grad_(True)
    kw = {"num_items": num_items} if loss_type == "dapo" else {}
    loss, m = clipped_policy_loss(logp, OLD, ADV, torch.zeros_like(MASK), loss_type=loss_type, **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))
    assert all(torch.isfinite(v) for v in m.values())


def test_dapo_fractional_num_items_is_not_clamped():
    # DDP: global tokens / world size may be < 1 (1 token over 2 ranks -> 0.5) and must be kept
    mask = torch.zeros_like(MASK)
    mask[1, 0] = 1.0  # seq 1 tok 0 costs 0.8 (low clip)
    loss, _ = clipped_policy_loss(LOGP, OLD, ADV, mask, num_items=torch.tensor(0.5))
    close(loss, 0.8 / 0.5)


def test_loss_kl_and_masked_mean_run_in_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(4, 6, generator=g) * 3).to(torch.bfloat16)
    old = (logp.float() + 0.01 * torch.randn(4, 6, generator=g)).to(torch.bfloat16)
    adv = torch.randn(4, generator=g).to(torch.bfloat16)
    mask = torch.rand(4, 6, generator=g) > 0.3
    ref_loss, ref_m = clipped_policy_loss(logp.float(), old.float(), adv.float(), mask.float())
    ref_kl = masked_mean(kl_k3(logp.float(), old.float()), mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, m = clipped_policy_loss(logp, old, adv, mask)
        kl = masked_mean(kl_k3(logp, old), mask)
    assert loss.dtype == kl.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(kl, ref_kl, atol=1e-6, rtol=0)
    for key in ref_m:
        torch.testing.assert_close(m[key], ref_m[key], atol=1e-6, rtol=0)
