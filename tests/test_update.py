"""The policy update (rl/update.py): micro-batching, loss normalisers, safe steps, config checks."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
from omegaconf import OmegaConf

from grace_lightning.rl.update import (
    PolicyUpdater,
    UpdateConfig,
    UpdateHooks,
    padded_tokens,
    plan_micro_batches,
    row_costs,
    score_rows,
    split_to_count,
    validate_update_config,
)
from grace_lightning.rollout.engine import RolloutBatch

P, K, LP, R = 3, 3, 7, 6  # prompts, rollouts per prompt, max prompt length, max response length


def make_rollouts(vocab: int, seed: int = 0) -> RolloutBatch:
    """P prompts of different lengths (left-padded), K responses each of different lengths."""
    g = torch.Generator().manual_seed(seed)
    prompt_len = torch.tensor([7, 4, 5])
    prompt_ids = torch.randint(3, vocab, (P, LP), generator=g)
    prompt_mask = (torch.arange(LP)[None] >= LP - prompt_len[:, None]).long()  # (P, LP)
    prompt_ids = prompt_ids * prompt_mask + 2 * (1 - prompt_mask)  # pad id 2
    lengths = torch.tensor([6, 3, 1, 5, 6, 2, 4, 4, 3])  # (P*K,)
    response_mask = (torch.arange(R)[None] < lengths[:, None]).long()  # (N, R)
    response_ids = torch.randint(3, vocab, (P * K, R), generator=g) * response_mask
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        row_to_prompt=torch.arange(P).repeat_interleave(K),
        response_ids=response_ids + 2 * (1 - response_mask),
        response_mask=response_mask,
        finished=torch.ones(P * K, dtype=torch.bool),
        temperatures=torch.full((P * K,), 0.9),
        logprobs=None,
        pooled=None,
    )


@pytest.fixture(scope="module")
def setup(tiny_backbone):
    model, _ = tiny_backbone
    policy = copy.deepcopy(model).float().train()
    ro = make_rollouts(policy.config.vocab_size)
    # old log-probs a little off-policy, so the clip and the dual clip both bind somewhere
    g = torch.Generator().manual_seed(1)
    plan = [torch.arange(P * K)]
    exact = score_rows(policy, ro, plan, share_prompt=False)
    ro.logprobs = (exact + 0.3 * torch.randn(exact.shape, generator=g)) * ro.response_mask
    advantages = torch.randn(P * K, generator=g)
    loss_weight = torch.ones(P * K)
    loss_weight[4] = 0.0  # a masked (e.g. truncated) rollout
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return policy, ref, ro, advantages, loss_weight


def grads_of_one_step(policy, ref, ro, adv, weight, **cfg_kw) -> dict[str, torch.Tensor]:
    """Gradients of one optimiser step over the whole rollout batch (one mini-batch)."""
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
    updater = PolicyUpdater(cfg, policy, hooks, reference=lambda: nullcontext(ref))
    updater.update(ro, adv, weight)
    assert got, "the step never ran"
    return got


SPLITS = [
    {"micro_batch_size": 2},  # partial groups, a group straddling two micro-batches
    # token budget (padded tokens, rl/update.py padded_tokens): some whole groups, some split
    {"max_tokens_per_micro_batch": 20},
]


@pytest.mark.parametrize("share_prompt", [True, False], ids=["shared_prompt", "full_seq"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_split_and_unsplit_steps_give_the_same_gradient(setup, loss_type, share_prompt):
    policy, ref, ro, adv, weight = setup
    # with a KL term once (its masked mean is over the mini-batch too)
    beta = 0.05 if loss_type == "dapo" and share_prompt else 0.0
    kw = dict(loss_type=loss_type, share_prompt=share_prompt, beta=beta)
    want = grads_of_one_step(policy, ref, ro, adv, weight, **kw)
    scale = max(float(g.abs().max()) for g in want.values())
    assert scale > 1e-4, "the test needs a gradient to compare"
    for split in SPLITS:
        got = grads_of_one_step(policy, ref, ro, adv, weight, **kw, **split)
        for name, g in want.items():
            # fp32: only the summation order differs (different padding and batch shapes)
            torch.testing.assert_close(got[name], g, atol=1e-6, rtol=1e-4, msg=f"{split} {name}")


def test_the_split_really_changes_the_micro_batches(setup):
    """The test above compares different work: 1, 2 and K rows, and the budget, all split."""
    _, _, ro, _, _ = setup
    costs = row_costs(ro.prompt_mask, ro.row_to_prompt, ro.response_mask)
    groups = PolicyUpdater.groups_of(ro, range(P))
    plan = plan_micro_batches(groups, costs, max_rows=2)
    assert [p.tolist() for p in plan] == [[0, 1], [2, 3], [4, 5], [6, 7], [8]]
    plan = plan_micro_batches(groups, costs, max_tokens=20)
    assert len(plan) > 1 and all(padded_tokens(p.tolist(), costs) <= 20 for p in plan)
    assert any(len(p) == K for p in plan) and any(len(p) < K for p in plan), plan


def test_plan_keeps_whole_groups_when_they_fit_and_covers_every_row_once():
    groups = [torch.arange(i * 4, i * 4 + 4) for i in range(3)]  # 3 groups of 4 rows
    costs = torch.full((12,), 10)
    plan = plan_micro_batches(groups, costs, max_rows=8)
    assert [p.tolist() for p in plan] == [list(range(8)), list(range(8, 12))]
    plan = plan_micro_batches(groups, costs, max_tokens=50)  # a group (40) fits, two do not
    assert [p.tolist() for p in plan] == [list(range(4)), list(range(4, 8)), list(range(8, 12))]
    plan = plan_micro_batches(groups, costs, max_rows=3)  # smaller than a group: split
    assert torch.cat(plan).tolist() == list(range(12)) and all(len(p) <= 3 for p in plan)
    even = split_to_count(plan, 6)  # another rank packed into 6: split the largest
    assert len(even) == 6 and torch.cat(even).tolist() == list(range(12))


def test_a_row_over_the_token_budget_names_the_knob():
    groups = [torch.arange(2)]
    with pytest.raises(RuntimeError, match="algo.max_tokens_per_micro_batch=10.*>= 12"):
        plan_micro_batches(groups, torch.tensor([5, 12]), max_tokens=10)


def cfg_with(**algo):
    base = {
        "algo": {"prompts_per_minibatch": 2, "num_iterations": 1, **algo},
        "rollout": {"num_generations": 4, "max_new_tokens": 100},
        "prompt": {"max_prompt_tokens": 50},
    }
    return OmegaConf.create(base)


@pytest.mark.parametrize(
    "algo, message",
    [
        ({"micro_batch_size": 9}, r"micro_batch_size=9 is larger than a rank's mini-batch.*<=8"),
        ({"micro_batch_size": 0}, "micro_batch_size=0"),
        ({"micro_batch_size": "abc"}, "micro_batch_size='abc'"),
        ({"max_tokens_per_micro_batch": 149}, r"cannot hold one row.*>=150"),
        ({"old_logprobs": "fresh"}, "old_logprobs"),
        ({"num_iterations": 0}, "num_iterations"),
    ],
)
def test_bad_update_knobs_fail_with_what_to_change(algo, message):
    with pytest.raises(ValueError, match=message):
        validate_update_config(cfg_with(**algo))
    validate_update_config(cfg_with(micro_batch_size=8, max_tokens_per_micro_batch=150))


def test_micro_batch_size_is_bounded_by_a_ranks_share_of_the_global_mini_batch():
    """algo.prompts_per_minibatch is global (split over the ranks), micro_batch_size per rank
    (verl per_gpu): 2 prompts x 4 rollouts over 2 ranks = 4 rows a rank."""
    validate_update_config(cfg_with(micro_batch_size=4), world=2)
    with pytest.raises(ValueError, match=r"micro_batch_size=8 .* / 2 ranks .* = 4 rows.*<=4"):
        validate_update_config(cfg_with(micro_batch_size=8), world=2)
    validate_update_config(cfg_with(micro_batch_size=8), world=None)  # unknown world: as 1


def test_nonfinite_gradient_skips_the_step_without_touching_weights_or_optimiser(setup):
    policy, ref, ro, adv, weight = setup
    policy = copy.deepcopy(policy)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    steps: list[str] = []

    def hooks():
        return UpdateHooks(
            zero_grad=lambda: opt.zero_grad(set_to_none=True),
            step=lambda: (steps.append("step"), opt.step()),
            skip_step=lambda: steps.append("skip"),
        )

    cfg = UpdateConfig(num_generations=K, prompts_per_minibatch=P, max_completion_length=R)
    PolicyUpdater(cfg, policy, hooks()).update(ro, adv, weight)  # a good step: state exists
    assert steps == ["step"]
    weights = {n: p.detach().clone() for n, p in policy.named_parameters()}
    state = copy.deepcopy(opt.state_dict())

    poisoned = next(iter(policy.parameters()))
    handle = poisoned.register_hook(lambda g: g * float("nan"))
    updater = PolicyUpdater(cfg, policy, hooks())
    out = updater.update(ro, adv, weight)
    handle.remove()

    assert steps == ["step", "skip"] and updater.skipped == 1 and out["update_skipped"] == 1.0
    for n, p in policy.named_parameters():
        assert torch.equal(p, weights[n]), n
        assert p.grad is None, "a skipped step leaves no gradient behind"
    after = opt.state_dict()
    assert after["param_groups"] == state["param_groups"]
    for i, s in state["state"].items():
        for key, value in s.items():
            assert torch.equal(after["state"][i][key], value), (i, key)


def test_recompute_is_a_no_grad_eval_pass_and_restores_train_mode(setup):
    policy, _, ro, _, _ = setup
    policy = copy.deepcopy(policy).train()
    seen = []
    handle = policy.register_forward_pre_hook(
        lambda m, args: seen.append((m.training, torch.is_grad_enabled()))
    )
    groups = PolicyUpdater.groups_of(ro, range(P))
    costs = row_costs(ro.prompt_mask, ro.row_to_prompt, ro.response_mask)
    old = score_rows(policy, ro, plan_micro_batches(groups, costs, max_rows=2), share_prompt=True)
    handle.remove()
    assert old.grad_fn is None and old.dtype == torch.float32
    assert policy.training, "train mode is restored after the pass"
    decoder_calls = []
    handle = policy.get_decoder().register_forward_pre_hook(
        lambda m, args: decoder_calls.append((m.training, torch.is_grad_enabled()))
    )
    score_rows(policy, ro, plan_micro_batches(groups, costs, max_rows=2), share_prompt=True)
    handle.remove()
    assert len(decoder_calls) >= 5, "micro-batched: several passes"  # 5 micro-batches x 2 passes
    assert all(not training and not grad for training, grad in decoder_calls)
    # and the values equal one unsplit pass (masked positions zero)
    whole = score_rows(policy, ro, [torch.arange(P * K)], share_prompt=False)
    torch.testing.assert_close(old, whole, atol=1e-5, rtol=1e-5)
