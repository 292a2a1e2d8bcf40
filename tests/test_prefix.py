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
    one_batch = encode_prompts(*args, batch_size=len(prompts), share_prefix=True)
    torch.testing.assert_close(one_batch, plain, atol=1e-5, rtol=1e-5)


def _generate(model, tok, pr, steps, **engine_kw):
    engine = HFRolloutEngine(model, tok, max_new_tokens=steps, **engine_kw)
    return engine.generate(
        pr.encode(TEXTS[:3]), [2, 1, 1], [1.0, 0.5, 0.0], pr.system_len, seeds=[1, 2, 3]
    )


@pytest.mark.parametrize("backbone", ["tiny_backbone", "smollm2_backbone"])
def test_rollouts_with_shared_prefix_and_prompt_kv_equal_per_row_copies(backbone, request):
    model, tok = request.getfixturevalue(backbone)
    pr = ChatPrompter(tok)
    steps = 10 if backbone == "tiny_backbone" else 5  # SmolLM2 on CPU: keep it short
    copies = _generate(model, tok, pr, steps, share_prompt_kv=False)
    for kw in (dict(share_prefix=False), dict(share_prefix=True)):
        rb = _generate(model, tok, pr, steps, **kw)
        assert torch.equal(rb.response_ids, copies.response_ids), kw  # same rationales
        assert torch.equal(rb.response_mask, copies.response_mask)
        assert torch.equal(rb.finished, copies.finished)
        torch.testing.assert_close(rb.logprobs, copies.logprobs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rb.pooled, copies.pooled, atol=1e-5, rtol=1e-5)
        assert F.cosine_similarity(rb.pooled, copies.pooled).min() >= 0.99999
        torch.testing.assert_close(rb.prompt_ids, copies.prompt_ids)  # loss pass input unchanged


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
