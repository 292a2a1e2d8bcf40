"""The joint objective (rl/joint.py): loss-pass pooling equals the rollout's, InfoNCE by hand."""

from __future__ import annotations

import math

import pytest
import torch

from grace_lightning.contrastive import info_nce
from grace_lightning.prompts import ChatPrompter
from grace_lightning.rl.joint import (
    JointTargets,
    joint_infonce_loss,
    pool_loss_pass,
    rollout_infonce,
    rows_logprobs_and_embedding,
    validate_joint_config,
)
from grace_lightning.rl.update import rows_logprobs
from grace_lightning.rollout.engine import HFRolloutEngine

Q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # two groups' queries, D = 2


# ----------------------------------------------------------------------------- InfoNCE by hand


def test_infonce_hand_worked_in_batch_and_own_group():
    x = torch.tensor([[2.0, 0.0]])  # one rollout of group 0; cosines: q0 1, q1 0, negative -1
    negs = torch.tensor([[[-1.0, 0.0]], [[0.0, 0.0]]])  # group 1's negative is padding
    g = torch.tensor([0])
    # no negatives, tau 1: -log(e^1 / (e^1 + e^0)) = log(1 + e^-1)
    got = rollout_infonce(x, g, Q, None, tau=1.0)
    assert got.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    # + hard negative (cos -1), tau 0.5: logits 2, 0, -2 -> log(1 + e^-2 + e^-4)
    got = rollout_infonce(x, g, Q, negs, tau=0.5)
    assert got.item() == pytest.approx(math.log(1 + math.exp(-2) + math.exp(-4)), abs=1e-6)
    # own group only: q0 and its negative -> log(1 + e^-4)
    got = rollout_infonce(x, g, Q, negs, tau=0.5, in_batch=False)
    assert got.item() == pytest.approx(math.log(1 + math.exp(-4)), abs=1e-6)
    # without negatives and in_batch=False the only candidate is the positive: loss 0
    assert rollout_infonce(x, g, Q, None, tau=0.5, in_batch=False).item() == pytest.approx(0.0)


def test_joint_loss_hand_worked_mean_over_rollouts():
    # B=2, K=2; rollouts at 0 and 90 degrees from their own query. tau = 1.
    emb = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 3.0], [1.0, 0.0]]])
    # rows: (g0, cos q0 1, q1 0) -> log(1+e^-1); (g0, 0, 1) -> log(1+e^1);
    #       (g1, q0 0, q1 1) -> log(1+e^-1); (g1, 1, 0) -> log(1+e^1)
    want = (2 * math.log(1 + math.exp(-1)) + 2 * math.log(1 + math.exp(1))) / 4
    got = joint_infonce_loss(emb, Q, None, tau=1.0)
    assert got.item() == pytest.approx(want, abs=1e-6)


def test_k1_equals_the_infonce_baseline_with_roles_swapped():
    torch.manual_seed(0)
    B, M, D = 4, 2, 8
    docs, queries, negs = torch.randn(B, 1, D), torch.randn(B, D), torch.randn(B, M, D)
    got = joint_infonce_loss(docs, queries, negs, tau=0.05)
    want, _ = info_nce(docs[:, 0], torch.cat([queries, negs.flatten(0, 1)]), 0.05)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_padded_negatives_are_not_candidates():
    torch.manual_seed(1)
    emb, q = torch.randn(3, 2, 5), torch.randn(3, 5)
    negs = torch.randn(3, 1, 5)
    padded = torch.cat([negs, torch.zeros(3, 2, 5)], dim=1)  # (3, 3, 5), two padding slots
    a = joint_infonce_loss(emb, q, negs, tau=0.1)
    b = joint_infonce_loss(emb, q, padded, tau=0.1)
    assert a.item() == pytest.approx(b.item(), abs=1e-6)
    # and a padding slot is not a cosine-0 candidate: adding a real orthogonal one changes it
    ortho = torch.cat([negs, torch.randn(3, 1, 5)], dim=1)
    assert abs(joint_infonce_loss(emb, q, ortho, tau=0.1).item() - a.item()) > 1e-3


def test_gradient_reaches_rollouts_only_and_decomposes_over_micro_batches():
    torch.manual_seed(2)
    B, K, M, D = 3, 4, 2, 6
    emb = torch.randn(B, K, D, requires_grad=True)
    q = torch.randn(B, D, requires_grad=True)
    negs = torch.randn(B, M, D, requires_grad=True)
    joint_infonce_loss(emb, q, negs, tau=0.1).backward()
    assert q.grad is None and negs.grad is None  # anchors are stop-gradient
    full = emb.grad.clone()
    # micro-batches of 5 rows (groups split across them), each its share of the mean
    emb.grad = None
    rows = emb.reshape(B * K, D)
    group = torch.arange(B).repeat_interleave(K)
    for part in torch.arange(B * K).split(5):
        loss = rollout_infonce(rows[part], group[part], q, negs, tau=0.1).sum() / (B * K)
        loss.backward()
    torch.testing.assert_close(emb.grad, full, rtol=1e-5, atol=1e-7)


def test_joint_targets_micro_losses_add_up_to_weighted_mean():
    torch.manual_seed(4)
    B, K, M, D = 3, 2, 1, 4
    emb = torch.randn(B, K, D)
    q, negs = torch.randn(B, D), torch.randn(B, M, D)
    t = JointTargets(q, negs, torch.arange(B).repeat_interleave(K), 0, weight=0.5, tau=0.1)
    rows = emb.reshape(B * K, D)
    parts = [t.micro_loss(rows[p], p, B * K) for p in torch.arange(B * K).split(4)]
    total = sum(loss for loss, _ in parts)
    assert total.item() == pytest.approx(0.5 * joint_infonce_loss(emb, q, negs, tau=0.1).item())
    infonce = sum(s["joint/infonce"] for _, s in parts) / (B * K)
    assert infonce == pytest.approx(joint_infonce_loss(emb, q, negs, tau=0.1).item(), rel=1e-5)
    # accuracy by hand: rows at their own query -> hits; a row at another query -> miss
    t = JointTargets(Q, None, torch.tensor([0, 1, 0]), 0, weight=1.0, tau=1.0)
    _, s = t.micro_loss(torch.tensor([[1.0, 0.1], [0.1, 1.0], [0.0, 1.0]]), torch.arange(3), 3)
    assert s["joint/acc"] == 2.0


def test_fp32_under_bf16_autocast():
    torch.manual_seed(3)
    emb, q, negs = torch.randn(2, 3, 16), torch.randn(2, 16), torch.randn(2, 2, 16)
    want = joint_infonce_loss(emb, q, negs, tau=0.02)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = joint_infonce_loss(emb, q, negs, tau=0.02)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), abs=1e-6)


@pytest.mark.parametrize(
    ("algo", "message"),
    [
        ({"contrastive_weight": -1.0}, "contrastive_weight"),
        ({"contrastive_weight": "high"}, "contrastive_weight"),
        ({"contrastive_tau": 0}, "contrastive_tau"),
        ({"contrastive_in_batch": "yes"}, "contrastive_in_batch"),
    ],
)
def test_bad_joint_knobs_fail_with_what_to_change(algo, message):
    with pytest.raises(ValueError, match=message):
        validate_joint_config(algo)
    validate_joint_config({})  # absent = the paper
    validate_joint_config({"contrastive_weight": 1, "contrastive_tau": 0.05})


def test_tau_must_be_positive():
    with pytest.raises(ValueError, match="contrastive_tau"):
        rollout_infonce(torch.ones(1, 2), torch.tensor([0]), Q, tau=0.0)


# ----------------------------------------------------------------------------- pooling


def test_pool_loss_pass_by_hand():
    # one prompt [pad, sys, t1, t2] (system_len 1 -> t1, t2 pooled), two rows of it
    prompt_hidden = torch.tensor([[[9.0], [7.0], [1.0], [3.0]]])  # (1, 4, 1)
    prompt_mask = torch.tensor([[0, 1, 1, 1]])
    response_hidden = torch.tensor([[[5.0], [6.0], [100.0]], [[2.0], [50.0], [60.0]]])
    response_mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    got = pool_loss_pass(
        prompt_hidden, prompt_mask, response_hidden, response_mask, 1, torch.tensor([0, 0])
    )
    # row 0: (1 + 3 + 5 + 6) / 4; row 1: (1 + 3 + 2) / 3
    torch.testing.assert_close(got, torch.tensor([[15 / 4], [6 / 3]]))


@pytest.fixture(scope="module")
def rollout(tiny_backbone):
    """Rows of two prompts (different lengths), some ending early with EOS, some cut off."""
    model, tok = tiny_backbone
    prompter = ChatPrompter(tok, "Explain the text.", 128)
    prompts = prompter.encode(["A cat sat on the mat.", "Stocks fell sharply on Monday after"])
    kw = dict(num_samples=3, temperature=1.0, system_len=prompter.system_len, seeds=[1, 2])
    first = HFRolloutEngine(model, tok, max_new_tokens=6, eos_token_ids=[-1]).generate(
        prompts, **kw
    )
    # the same draws, with row 0's third token as EOS: row 0 (at least) now stops early
    eos = int(first.response_ids[0, 2])
    ro = HFRolloutEngine(model, tok, max_new_tokens=6, eos_token_ids=[eos]).generate(prompts, **kw)
    assert ro.finished.any() and not ro.finished.all()
    return model, ro, prompter.system_len


@pytest.mark.parametrize("share_prompt", [True, False])
def test_loss_pass_pooling_equals_rollout_embedding(rollout, share_prompt):
    model, ro, system_len = rollout
    rows = torch.tensor([0, 2, 3, 5])  # rows of both prompts, not whole groups
    with torch.no_grad():
        logp, _, pooled = rows_logprobs_and_embedding(
            model, ro, rows, system_len, share_prompt=share_prompt
        )
        ref_logp, _ = rows_logprobs(model, ro, rows, share_prompt=share_prompt)
    torch.testing.assert_close(pooled, ro.pooled[rows], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-5)
    r = logp.size(1)
    mask = ro.response_mask[rows][:, :r].bool()
    torch.testing.assert_close(logp[mask], ro.logprobs[rows][:, :r][mask], rtol=1e-4, atol=1e-4)


def test_joint_loss_gradient_reaches_the_policy(tiny_backbone):
    from grace_lightning.models.backbone import BackboneConfig, load_backbone

    model, tok = load_backbone(BackboneConfig(name="tiny", source="tiny"))  # own copy: grads
    prompter = ChatPrompter(tok, "Explain the text.", 128)
    prompts = prompter.encode(["one two three", "four five"])
    engine = HFRolloutEngine(model.eval(), tok, max_new_tokens=4)
    torch.manual_seed(0)
    ro = engine.generate(prompts, num_samples=2, temperature=1.0, system_len=prompter.system_len)
    _, _, pooled = rows_logprobs_and_embedding(model, ro, torch.arange(4), prompter.system_len)
    query = ro.pooled[[0, 2]].detach()  # stand-in anchors
    joint_infonce_loss(pooled.view(2, 2, -1), query, None, tau=0.1).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_micro_batched_joint_loss_gives_the_unsplit_gradient(rollout):
    """The update's contract: micro-batches with the mini-batch's normaliser = one pass."""
    from grace_lightning.models.backbone import BackboneConfig, load_backbone

    _, ro, system_len = rollout
    model, _ = load_backbone(BackboneConfig(name="tiny", source="tiny"))  # own copy: grads
    model.eval()  # no dropout: both passes see the same function
    n = ro.row_to_prompt.numel()
    joint = JointTargets(
        ro.pooled[[0, 3]] + 0.1, None, ro.row_to_prompt, system_len, weight=2.0, tau=0.1
    )

    def grads(plan):
        model.zero_grad(set_to_none=True)
        for rows in plan:
            _, _, pooled = rows_logprobs_and_embedding(model, ro, rows, system_len)
            loss, _ = joint.micro_loss(pooled, rows, n)
            loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    whole = grads([torch.arange(n)])
    split = grads([torch.tensor([0, 1]), torch.tensor([2, 3, 4]), torch.tensor([5])])
    assert len(whole) == len(split) > 0
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
