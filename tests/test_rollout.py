"""Rollout engine and loss-pass log-probs against plain full-sequence forwards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from grace_lightning.embedding import encode_prompts
from grace_lightning.prompts import DEFAULT_SYSTEM_PROMPT, ChatPrompter
from grace_lightning.rl.policy import response_logprobs
from grace_lightning.rollout.budget import kv_cost, plan_batches
from grace_lightning.rollout.engine import HFRolloutEngine, filter_logits, left_pad

TEXTS = ["The cat sat on the mat.", "Quantum computers use qubits.", "Paris is in France."]


def _full_forward(model, prompt, response):
    with torch.no_grad():
        out = model(torch.tensor([prompt + response]), output_hidden_states=True)
    return out.hidden_states[-1][0], out.logits[0]


def test_prompter_system_len_and_truncation(tiny_backbone):
    _, tok = tiny_backbone
    pr = ChatPrompter(tok, DEFAULT_SYSTEM_PROMPT, max_prompt_tokens=64)
    ids = pr.encode(["hello world"])[0]
    head = tok.decode(ids[: pr.system_len])
    assert DEFAULT_SYSTEM_PROMPT in head and "hello" not in head
    assert tok.decode(ids[pr.system_len :]).startswith("hello world")
    long_ids = pr.encode(["word " * 500])[0]
    assert len(long_ids) == 64
    tail = ids[-pr.tail_len :]  # end of the user turn + the assistant header
    assert "assistant" in tok.decode(tail) and "hello" not in tok.decode(tail)
    assert long_ids[-pr.tail_len :] == tail  # the assistant header survives truncation
    assert pr.lengths(["word " * 500])[0] > 64


def test_engine_embeddings_and_logprobs_match_full_forward(tiny_backbone):
    model, tok = tiny_backbone
    pr = ChatPrompter(tok)
    prompts = pr.encode(TEXTS)
    engine = HFRolloutEngine(model, tok, max_new_tokens=12)
    g = torch.Generator().manual_seed(0)
    rb = engine.generate(prompts, [3, 1, 2], [1.0, 0.5, 0.7], pr.system_len, generator=g)
    assert rb.row_to_prompt.tolist() == [0, 0, 0, 1, 2, 2]
    assert rb.embeddings.shape == (6, model.config.hidden_size)
    for r in range(6):
        p = prompts[rb.row_to_prompt[r]]
        resp = rb.response_ids[r][rb.response_mask[r].bool()].tolist()
        hidden, logits = _full_forward(model, p, resp)
        expected = F.normalize(hidden[pr.system_len :].mean(0), dim=-1)
        torch.testing.assert_close(rb.embeddings[r], expected, atol=1e-5, rtol=1e-4)
        t = float(rb.temperatures[r])
        lp = (logits[len(p) - 1 : -1] / t).log_softmax(-1)
        lp = lp.gather(-1, torch.tensor(resp)[:, None]).squeeze(-1)
        torch.testing.assert_close(rb.logprobs[r][: len(resp)], lp, atol=1e-4, rtol=1e-4)
        assert rb.finished[r] == (resp[-1] in engine.eos_ids)


def test_engine_is_deterministic_for_a_seed(tiny_backbone):
    model, tok = tiny_backbone
    pr = ChatPrompter(tok)
    engine = HFRolloutEngine(model, tok, max_new_tokens=8)
    runs = [
        engine.generate(pr.encode(TEXTS), 2, 1.0, pr.system_len, torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    assert torch.equal(runs[0].response_ids, runs[1].response_ids)
    other = engine.generate(
        pr.encode(TEXTS), 2, 1.0, pr.system_len, torch.Generator().manual_seed(4)
    )
    assert not torch.equal(runs[0].response_ids, other.response_ids)


def test_engine_stops_rows_at_eos(smollm2_backbone):
    model, tok = smollm2_backbone
    pr = ChatPrompter(tok)
    engine = HFRolloutEngine(model, tok, max_new_tokens=40)
    rb = engine.generate(
        pr.encode(["Say only: yes."]), 2, 0.3, pr.system_len, torch.Generator().manual_seed(0)
    )
    for r in range(2):
        n = int(rb.lengths[r])
        if rb.finished[r]:
            assert rb.response_ids[r, n - 1].item() in engine.eos_ids
            assert (rb.response_mask[r, n:] == 0).all()
        else:
            assert n == 40


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert not torch.isinf(filter_logits(logits, top_p=1.0)).any()


def test_shared_prompt_logprobs_and_grads_equal_full_sequence(tiny_backbone):
    model, tok = tiny_backbone
    pr = ChatPrompter(tok)
    engine = HFRolloutEngine(model, tok, max_new_tokens=10)
    rb = engine.generate(
        pr.encode(TEXTS[:2]), 3, 1.0, pr.system_len, torch.Generator().manual_seed(1)
    )
    results = []
    for share in (True, False):
        model.zero_grad()
        logp, ent = response_logprobs(
            model,
            rb.prompt_ids,
            rb.prompt_mask,
            rb.response_ids,
            rb.response_mask,
            rb.row_to_prompt,
            rb.temperatures,
            share_prompt=share,
            with_entropy=True,
        )
        (logp.sum()).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((logp.detach(), ent, grads.clone()))
    model.zero_grad()
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-4, rtol=1e-4)
    rel = (results[0][2] - results[1][2]).norm() / results[1][2].norm()
    assert rel < 1e-4
    # the rollout's own log-probs are the "old" log-probs: same numbers
    torch.testing.assert_close(results[0][0], rb.logprobs * rb.response_mask, atol=1e-4, rtol=1e-4)


def test_base_mode_pools_prompt_after_system(tiny_backbone):
    model, tok = tiny_backbone
    pr = ChatPrompter(tok)
    prompts = pr.encode(TEXTS)
    emb = encode_prompts(model, prompts, pr.system_len, tok.pad_token_id, batch_size=2)
    for i, p in enumerate(prompts):
        hidden, _ = _full_forward(model, p, [])
        torch.testing.assert_close(emb[i], hidden[pr.system_len :].mean(0), atol=1e-5, rtol=1e-4)
    ids, mask = left_pad([[1, 2], [3]], pad_id=0)
    assert ids.tolist() == [[1, 2], [0, 3]] and mask.tolist() == [[1, 1], [0, 1]]


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch(tiny_backbone):
    model, tok = tiny_backbone
    pr = ChatPrompter(tok)
    engine = HFRolloutEngine(model, tok, max_new_tokens=8)
    alone = engine.generate(pr.encode(TEXTS[:1]), 2, 1.0, pr.system_len, seeds=[11])
    mixed = engine.generate(
        pr.encode(TEXTS[2:] + TEXTS[:1]), [3, 2], [0.7, 1.0], pr.system_len, seeds=[5, 11]
    )
    torch.testing.assert_close(
        mixed.response_ids[3:], alone.response_ids[:, : mixed.response_ids.size(1)]
    )
    torch.testing.assert_close(mixed.pooled[3:], alone.pooled, atol=1e-5, rtol=1e-4)
    assert not torch.equal(alone.response_ids[0], alone.response_ids[1])  # samples differ
    greedy = engine.generate(pr.encode(TEXTS[:1]), 2, 0.0, pr.system_len, seeds=[1])
    assert torch.equal(greedy.response_ids[0], greedy.response_ids[1])


def test_plan_batches_keeps_prompts_whole_and_splits_only_oversized_ones():
    lengths, counts = [10, 12, 8, 9], [2, 5, 1, 1]
    # rows only: prompt 1 (5 rows) cannot fit 3 rows -> cut into 3 + 2, its tail shares a batch
    plan = plan_batches(lengths, counts, max_new_tokens=4, max_rows_per_batch=3)
    assert plan == [[(0, 0, 2)], [(1, 0, 3)], [(1, 3, 2), (2, 0, 1)], [(3, 0, 1)]]
    # every row exactly once, in request order
    rows = [(p, first + j) for batch in plan for p, first, n in batch for j in range(n)]
    assert rows == [(p, j) for p, c in enumerate(counts) for j in range(c)]
    # KV: shared layout costs S + P*(L-S) + N*new, copies N*(L+new)
    assert kv_cost([(0, 0, 2), (2, 0, 1)], lengths, 4, prefix_len=6, shared=True) == 6 + 2 * 4 + 12
    assert kv_cost([(0, 0, 2), (2, 0, 1)], lengths, 4, prefix_len=0, shared=False) == 3 * 14
    plan = plan_batches(lengths, counts, 4, max_kv_tokens=40, prefix_len=6)
    assert all(kv_cost(b, lengths, 4, 6, True) <= 40 for b in plan)
    assert plan_batches(lengths, counts, 4) == [[(p, 0, c) for p, c in enumerate(counts)]]


@pytest.mark.parametrize("budget", ["rows", "kv", "rows_copies"])
def test_chunked_rollouts_equal_unchunked(tiny_backbone, budget):
    model, tok = tiny_backbone
    pr = ChatPrompter(tok)
    prompts = pr.encode(TEXTS)
    new = 10
    knobs = {
        "rows": dict(max_rows_per_batch=2),  # cuts prompt 0's three samples into 2 + 1
        "kv": dict(max_kv_tokens=max(map(len, prompts)) + 2 * new),  # one prompt, two rows
        "rows_copies": dict(max_rows_per_batch=4, share_prompt_kv=False),
    }[budget]
    args = (prompts, [3, 1, 2], [1.0, 0.5, 0.7], pr.system_len)
    whole = HFRolloutEngine(model, tok, max_new_tokens=new).generate(*args, seeds=[4, 5, 6])
    engine = HFRolloutEngine(model, tok, max_new_tokens=new, **knobs)
    split = engine.generate(*args, seeds=[4, 5, 6])
    assert len(engine.last_plan) > 1
    if budget != "rows_copies":
        assert len([b for b in engine.last_plan if b[0][0] == 0]) == 2  # prompt 0 was cut
    assert torch.equal(split.response_ids, whole.response_ids)  # same rationales
    assert torch.equal(split.response_mask, whole.response_mask)
    assert torch.equal(split.finished, whole.finished)
    assert torch.equal(split.row_to_prompt, whole.row_to_prompt)
    torch.testing.assert_close(split.temperatures, whole.temperatures)
    torch.testing.assert_close(split.logprobs, whole.logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split.pooled, whole.pooled, atol=1e-5, rtol=1e-5)


def test_budget_that_cannot_hold_one_row_fails_with_what_to_change(tiny_backbone):
    model, tok = tiny_backbone
    pr = ChatPrompter(tok)
    with pytest.raises(ValueError, match=r"rollout.max_kv_tokens=100 cannot hold one row.*>= 164"):
        HFRolloutEngine(model, tok, max_new_tokens=64, max_kv_tokens=100, max_prompt_tokens=100)
    engine = HFRolloutEngine(model, tok, max_new_tokens=64, max_kv_tokens=80)
    prompt = pr.encode(TEXTS[:1])
    with pytest.raises(ValueError, match="max_kv_tokens=80.*rollout.max_new_tokens=64"):
        engine.generate(prompt, 1, 1.0, pr.system_len, seeds=[0])
    with pytest.raises(ValueError, match="max_rows_per_batch=0"):
        HFRolloutEngine(model, tok, max_rows_per_batch=0)
    with pytest.raises(ValueError, match="max_kv_tokens=0"):
        HFRolloutEngine(model, tok, max_kv_tokens=0)


def test_progress_hook_counts_rows_up_to_the_total(tiny_backbone):
    model, tok = tiny_backbone
    pr = ChatPrompter(tok)
    calls = []
    engine = HFRolloutEngine(model, tok, max_new_tokens=12, max_rows_per_batch=3, progress_every=2)
    engine.progress = lambda *a: calls.append(a)
    rb = engine.generate(pr.encode(TEXTS), [3, 1, 2], 1.0, pr.system_len, seeds=[1, 2, 3])
    done = [c[0] for c in calls]
    assert len(calls) >= 3 and done == sorted(done) and done[-1] == 6
    assert all(c[1] == 6 for c in calls)
    tokens = [c[2] for c in calls]
    assert tokens == sorted(tokens) and tokens[-1] == int(rb.response_mask.sum())
    assert all(c[3] >= 0 for c in calls)


def test_rollout_progress_callback_shows_rows_on_the_tqdm_bar(tiny_backbone):
    import io
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import TQDMProgressBar
    from tqdm import tqdm

    from grace_lightning.callbacks.progress import RolloutProgress

    model, tok = tiny_backbone
    pr = ChatPrompter(tok)
    bar_cb = TQDMProgressBar()
    bar_cb.get_metrics = lambda trainer, module: {"loss": "0.1"}
    bar_cb.train_progress_bar = tqdm(total=1, disable=False, file=io.StringIO())
    trainer = SimpleNamespace(is_global_zero=True, progress_bar_callback=bar_cb)
    module = SimpleNamespace(engine=HFRolloutEngine(model, tok, max_new_tokens=8, progress_every=1))
    cb = RolloutProgress()
    cb.on_train_start(trainer, module)
    seen = []
    show = cb.show
    cb.show = lambda *a: (seen.append(a[2:]), show(*a))
    module.engine.generate(pr.encode(TEXTS), [3, 1, 2], 1.0, pr.system_len, seeds=[1, 2, 3])
    done = [s[0] for s in seen]
    assert done == sorted(done) and done[-1] == 6 and all(s[1] == 6 for s in seen)
    postfix = bar_cb.train_progress_bar.postfix
    assert "loss=0.1" in postfix and "rollout=6/6 rows" in postfix and "tok/s" in postfix
    # Lightning's RichProgressBar (its default when `rich` is installed): the metrics column
    from lightning.pytorch.callbacks import RichProgressBar

    shown = []
    rich_cb = RichProgressBar()
    rich_cb._metric_component = SimpleNamespace(update=shown.append)
    rich_cb.get_metrics = lambda trainer, module: {"loss": "0.1"}
    trainer.progress_bar_callback = rich_cb
    cb.on_train_start(trainer, module)
    module.engine.generate(pr.encode(TEXTS[:1]), 2, 1.0, pr.system_len, seeds=[1])
    assert shown[-1]["rollout"].startswith("2/2 rows") and shown[-1]["loss"] == "0.1"
    cb.on_train_end(trainer, module)
    assert module.engine.progress is None
