"""Shared system-prefix KV and shared prompt KV give the same numbers as the plain layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from grace_lightning.embedding import encode_prompts
from grace_lightning.prompts import ChatPrompter
from grace_lightning.rollout.engine import HFRolloutEngine
from grace_lightning.rollout.kv import SegmentedCache, shared_prefix_len, suffix_batch

TEXTS = [
    "A man is playing a guitar.",
    "Two dogs run through the snow near a fence.",
    "The stock market fell sharply on Monday after the announcement.",
    "Hi.",
    "A woman slices an onion.",
]


def test_shared_prefix_len_stops_at_system_len_and_differences():
    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 3, 4, 7, 8]]
    assert shared_prefix_len(prompts, limit=10) == 3  # first difference
    assert shared_prefix_len(prompts, limit=2) == 2  # never past system_len (pooling starts there)
    assert shared_prefix_len([[1, 2, 3], [1, 2, 3]], limit=10) == 2  # each keeps >= 1 own token
    assert shared_prefix_len(prompts, limit=0) == 0


def test_suffix_layout_pads_after_the_prefix_and_continues_positions():
    ids, mask, pos = suffix_batch([[7, 7, 1, 2, 3], [7, 7, 4]], start=2, pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 1]]  # [prefix | left-padded suffix]
    assert pos[0].tolist() == [2, 3, 4] and pos[1, -1].item() == 2  # as in the unshared prompt


def test_prompter_prefix_is_exactly_the_unpooled_head(tiny_backbone):
    _, tok = tiny_backbone
    pr = ChatPrompter(tok)
    prompts = pr.encode(TEXTS)
    start = shared_prefix_len(prompts, pr.system_len)
    assert start == pr.system_len  # system prompt + user header: all of it, nothing pooled


@pytest.mark.parametrize("backbone", ["tiny_backbone", "smollm2_backbone"])
def test_base_encoding_with_shared_prefix_equals_plain(backbone, request):
    model, tok = request.getfixturevalue(backbone)
    pr = ChatPrompter(tok)
    prompts = pr.encode(TEXTS)
    args = (model, prompts, pr.system_len, tok.pad_token_id)
    plain = encode_prompts(*args, batch_size=2, share_prefix=False)
    shared = encode_prompts(*args, batch_size=2, share_prefix=True)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    assert F.cosine_similarity(shared, plain).min() >= 0.99999
    for bs in (1, len(prompts)):  # no padding at all (a bare causal mask) / one padded batch
        one = encode_prompts(*args, batch_size=bs, share_prefix=True)
        torch.testing.assert_close(one, plain, atol=1e-5, rtol=1e-5)


def _generate(model, tok, pr, steps, **engine_kw):
    engine = HFRolloutEngine(model, tok, max_new_tokens=steps, **engine_kw)
    return engine.generate(
        pr.encode(TEXTS[:3]), [2, 1, 1], [1.0, 0.5, 0.0], pr.system_len, seeds=[1, 2, 3]
    )


def test_rollouts_with_shared_prefix_and_prompt_kv_equal_per_row_copies(tiny_backbone):
    model, tok = tiny_backbone
    pr = ChatPrompter(tok)
    copies = _generate(model, tok, pr, 10, share_prompt_kv=False)
    for kw in (dict(share_prefix=False), dict(share_prefix=True)):
        rb = _generate(model, tok, pr, 10, **kw)
        assert torch.equal(rb.response_ids, copies.response_ids), kw  # same rationales
        assert torch.equal(rb.response_mask, copies.response_mask)
        assert torch.equal(rb.finished, copies.finished)
        torch.testing.assert_close(rb.logprobs, copies.logprobs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rb.pooled, copies.pooled, atol=1e-5, rtol=1e-5)
        assert F.cosine_similarity(rb.pooled, copies.pooled).min() >= 0.99999
        torch.testing.assert_close(rb.prompt_ids, copies.prompt_ids)  # loss pass input unchanged
        if not kw["share_prefix"]:  # same shapes, same kernels: bit for bit
            assert torch.equal(rb.logprobs, copies.logprobs) and torch.equal(
                rb.pooled, copies.pooled
            )


def test_smollm2_rollouts_with_shared_prefix_match_full_forwards(smollm2_backbone):
    """Real weights: the shared-prefix path's log-probs and embeddings are those of a plain
    full-sequence forward of prompt + sampled response (whatever tokens were sampled: ~1e-5 float
    noise can flip a sampled token, see HFRolloutEngine; greedy rows cannot differ)."""
    model, tok = smollm2_backbone
    pr = ChatPrompter(tok)
    prompts = pr.encode(TEXTS[:3])
    rb = _generate(model, tok, pr, 5, share_prefix=True)
    copies = _generate(model, tok, pr, 5, share_prompt_kv=False)
    greedy = rb.temperatures == 0
    assert torch.equal(rb.response_ids[greedy], copies.response_ids[greedy])
    for r in range(len(rb.row_to_prompt)):
        p = prompts[rb.row_to_prompt[r]]
        resp = rb.response_ids[r][rb.response_mask[r].bool()].tolist()
        with torch.no_grad():
            out = model(torch.tensor([p + resp]), output_hidden_states=True)
        pooled = out.hidden_states[-1][0, pr.system_len :].mean(0)
        torch.testing.assert_close(rb.pooled[r], pooled, atol=1e-5, rtol=1e-4)
        t = float(rb.temperatures[r]) or 1.0
        lp = (out.logits[0, len(p) - 1 : -1] / t).log_softmax(-1)
        lp = lp.gather(-1, torch.tensor(resp)[:, None]).squeeze(-1)
        torch.testing.assert_close(rb.logprobs[r, : len(resp)], lp, atol=1e-4, rtol=1e-4)


def test_segmented_cache_holds_one_copy_of_prefix_and_prompts(tiny_backbone):
    """Persistent slots: S + P*T + N*cap instead of N*(S + T + cap)."""
    model, tok = tiny_backbone
    pr = ChatPrompter(tok)
    prompts = pr.encode(TEXTS[:2])
    decoder = model.get_decoder()
    from grace_lightning.rollout.engine import cache_kwarg
    from grace_lightning.rollout.kv import prefix_kv

    s = shared_prefix_len(prompts, pr.system_len)
    key = cache_kwarg(decoder)
    prefix = prefix_kv(decoder, key, prompts[0][:s], model.config.num_hidden_layers, "cpu")
    cache = SegmentedCache(model.config.num_hidden_layers, prefix)
    ids, mask, pos = suffix_batch(prompts, s, tok.pad_token_id)
    decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{key: cache})
    k, cap = 4, 16
    cache.promote(torch.arange(2).repeat_interleave(k), capacity=cap)
    cache.layers[0].update(*(torch.zeros(2 * k, 2, 1, 16),) * 2)  # one decode step allocates rows
    t = ids.size(1)
    assert cache.slots() == s + 2 * t + 2 * k * cap
    assert cache.slots() < 2 * k * (s + t + cap)
    assert cache.get_seq_length() == s + t + 1
