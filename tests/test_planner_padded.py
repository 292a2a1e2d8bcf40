"""The micro-batch token budget counts the padded rectangle the loss pass runs (issue 17, item 7).

The loss pass trims a micro-batch to its longest prompt ``lp`` and longest response ``r`` and
runs ``p x lp`` prompt tokens + ``n x r`` response tokens (shared-prompt pass) or ``n x (lp + r)``
(full sequences). Counting real tokens (the old planner) lets one long response in a group of
short ones put several times the budget through the model. Here every micro-batch of a plan with
mixed lengths is run and the token positions the decoder actually receives are counted.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from grace_lightning.rl.joint import rows_logprobs_and_embedding
from grace_lightning.rl.update import (
    PolicyUpdater,
    UpdateConfig,
    UpdateHooks,
    plan_micro_batches,
    row_costs,
    rows_logprobs,
)

K = 4
PROMPT_LENS = [12, 6, 9]
RESPONSE_LENS = [[30, 3, 3, 3], [5, 5, 5, 5], [2, 25, 2, 2]]  # one long response per group
BUDGET = 60  # >= the longest row (12 + 30): every row fits alone


def mixed_batch(vocab: int) -> SimpleNamespace:
    """A RolloutBatch-like batch: left-padded prompts, right-padded responses, mixed lengths."""
    g = torch.Generator().manual_seed(0)
    lp, r = max(PROMPT_LENS), max(max(x) for x in RESPONSE_LENS)
    prompt_ids = torch.zeros((len(PROMPT_LENS), lp), dtype=torch.long)  # (P, Lp)
    prompt_mask = torch.zeros_like(prompt_ids)
    for i, n in enumerate(PROMPT_LENS):
        prompt_ids[i, lp - n :] = torch.randint(3, vocab, (n,), generator=g)
        prompt_mask[i, lp - n :] = 1
    rows = [n for group in RESPONSE_LENS for n in group]
    response_ids = torch.zeros((len(rows), r), dtype=torch.long)  # (N, R)
    response_mask = torch.zeros_like(response_ids)
    for i, n in enumerate(rows):
        response_ids[i, :n] = torch.randint(3, vocab, (n,), generator=g)
        response_mask[i, :n] = 1
    return SimpleNamespace(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        row_to_prompt=torch.arange(len(PROMPT_LENS)).repeat_interleave(K),
        temperatures=torch.ones(len(rows)),
    )


def tokens_run(model, fn) -> int:
    """Token positions the decoder receives (input_ids.numel() summed over its calls) in fn()."""
    seen = []

    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen.append(ids.numel())

    handle = model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        fn()
    finally:
        handle.remove()
    return sum(seen)


def plan_of(model, ro, share_prompt: bool) -> list[torch.Tensor]:
    cfg = UpdateConfig(
        num_generations=K,
        prompts_per_minibatch=len(PROMPT_LENS),
        max_completion_length=ro.response_ids.size(1),
        max_tokens_per_micro_batch=BUDGET,
        share_prompt=share_prompt,
    )
    updater = PolicyUpdater(cfg, model, UpdateHooks(zero_grad=lambda: None, step=lambda: None))
    costs = row_costs(ro.prompt_mask, ro.row_to_prompt, ro.response_mask)
    return updater.plan(updater.groups_of(ro, range(len(PROMPT_LENS))), costs)


@pytest.mark.parametrize(
    "pass_,share_prompt,checkpointing",
    [
        ("policy", True, False),  # shared-prompt pass: p lp + n (r - 1)
        ("joint", True, False),  # joint pass: p lp + n r (the whole response runs)
        ("policy", False, False),  # full sequences: n (lp + r)
        ("policy", True, True),  # gradient checkpointing forces full sequences
    ],
    ids=["shared", "joint", "full", "checkpointing"],
)
def test_no_micro_batch_runs_more_padded_tokens_than_the_budget(
    tiny_backbone, pass_, share_prompt, checkpointing
):
    model, _ = tiny_backbone
    if checkpointing:
        model = copy.deepcopy(model)
        model.gradient_checkpointing_enable()  # as module.py (the name every transformers 5.x has)
        model.train()
    ro = mixed_batch(model.config.vocab_size)
    plan = plan_of(model, ro, share_prompt)
    assert sorted(torch.cat(plan).tolist()) == list(range(ro.response_ids.size(0)))
    assert any(len(p) > 1 for p in plan), "the budget should still pack rows together"
    for rows in plan:
        if pass_ == "joint":

            def run(rows=rows):
                rows_logprobs_and_embedding(model, ro, rows, 0, share_prompt=share_prompt)

        else:

            def run(rows=rows):
                rows_logprobs(model, ro, rows, share_prompt=share_prompt)

        with torch.set_grad_enabled(checkpointing):
            ran = tokens_run(model, run)
        assert ran <= BUDGET, f"micro-batch {rows.tolist()} ran {ran} token positions"


def test_real_token_counts_would_overrun_the_budget():
    """The batch above is a real test: packing by real tokens (the old planner's count) puts a
    micro-batch of more than the budget's padded tokens through the shared-prompt pass."""
    ro = mixed_batch(100)
    real = ro.prompt_mask.sum(-1)[ro.row_to_prompt] + ro.response_mask.sum(-1)  # (N,)
    groups = [torch.arange(i * K, (i + 1) * K) for i in range(len(PROMPT_LENS))]
    costs = row_costs(ro.prompt_mask, ro.row_to_prompt, ro.response_mask)
    bins, n_tok = [[]], 0  # the old greedy packing by real tokens, row by row
    for i in torch.cat(groups).tolist():
        if bins[-1] and n_tok + int(real[i]) > BUDGET:
            bins.append([])
            n_tok = 0
        bins[-1].append(i)
        n_tok += int(real[i])
    from grace_lightning.rl.update import padded_tokens

    assert max(padded_tokens(b, costs, shared=True) for b in bins) > BUDGET
    plan = plan_micro_batches(groups, costs, max_tokens=BUDGET)
    assert max(padded_tokens(p.tolist(), costs, shared=True) for p in plan) <= BUDGET


def test_padded_tokens_is_the_rectangle():
    ro = mixed_batch(100)
    costs = row_costs(ro.prompt_mask, ro.row_to_prompt, ro.response_mask)  # (N, 3)
    from grace_lightning.rl.update import padded_tokens

    rows = [0, 1, 4]  # prompts 0 (12 tokens) and 1 (6); responses 30, 3, 5
    assert padded_tokens(rows, costs, shared=True) == 2 * 12 + 3 * 30
    assert padded_tokens(rows, costs, shared=False) == 3 * (12 + 30)
    assert padded_tokens(rows, torch.tensor([7, 1, 1, 1, 2]), shared=True) == 3 * 7  # (N,)
