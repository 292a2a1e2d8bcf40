"""Rollout KV caches hold K and V in the autocast dtype (issue 17, item 7).

With fp32 master weights under bf16 autocast, transformers' RoPE builds cos/sin in the dtype of
the fp32 residual stream, so ``q_proj``/``k_proj``'s bf16 outputs come back from
``apply_rotary_pos_emb`` in fp32: without a cast at the cache, K is cached in fp32 (4 B) next to
a bf16 V (2 B), 1.5x the KV memory the memory model (``grace_lightning/scale.py``) assumes.
"""

from __future__ import annotations

import pytest
import torch
from transformers import cache_utils

from grace_lightning.prompts import ChatPrompter
from grace_lightning.rollout.engine import HFRolloutEngine
from grace_lightning.rollout.kv import SegmentedLayer

TEXTS = ["The cat sat on the mat.", "Quantum computers use qubits.", "Paris is in France."]


def _cached_tensors(cache) -> list[tuple[str, torch.Tensor]]:
    """Every K / V tensor a rollout cache holds after the rollout, named."""
    out = []
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, SegmentedLayer):
            for part in ("prefix", "prompt", "rows"):
                kv = getattr(layer, part)
                if kv is not None:
                    out += [(f"layer {i} {part} K", kv[0]), (f"layer {i} {part} V", kv[1])]
        else:
            out += [(f"layer {i} keys", layer.keys), (f"layer {i} values", layer.values)]
    return out


@pytest.fixture
def caches(monkeypatch):
    """Every transformers ``Cache`` built while the test runs (kept alive to inspect)."""
    made = []
    init = cache_utils.Cache.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(cache_utils.Cache, "__init__", recording_init)
    return made


@pytest.mark.parametrize(
    "share_prompt_kv,share_prefix",
    [(True, True), (True, False), (False, False)],
    ids=["segmented+prefix", "segmented", "dynamic"],
)
def test_rollout_caches_k_and_v_in_bf16_under_autocast(
    tiny_backbone, caches, share_prompt_kv, share_prefix
):
    model, tok = tiny_backbone
    assert next(model.parameters()).dtype == torch.float32  # fp32 master weights
    pr = ChatPrompter(tok)
    prompts = pr.encode(TEXTS)
    engine = HFRolloutEngine(
        model, tok, max_new_tokens=6, share_prompt_kv=share_prompt_kv, share_prefix=share_prefix
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rb = engine.generate(prompts, 3, 1.0, pr.system_len, seeds=[1, 2, 3])
    assert rb.response_ids.size(0) == 9
    tensors = [nt for c in caches for nt in _cached_tensors(c)]
    assert tensors, "the rollout built no KV cache"
    wrong = {name: t.dtype for name, t in tensors if t.dtype != torch.bfloat16}
    assert not wrong, f"cached in another dtype than bf16: {wrong}"


def test_without_autocast_the_cache_keeps_the_model_dtype(tiny_backbone, caches):
    model, tok = tiny_backbone
    pr = ChatPrompter(tok)
    engine = HFRolloutEngine(model, tok, max_new_tokens=4)
    engine.generate(pr.encode(TEXTS[:2]), 2, 1.0, pr.system_len, seeds=[1, 2])
    tensors = [nt for c in caches for nt in _cached_tensors(c)]
    assert tensors and all(t.dtype == torch.float32 for _, t in tensors)


def test_bf16_cache_changes_nothing_autocast_attention_would_not(tiny_backbone):
    """Casting K at the cache is what autocast's attention does to it anyway: the rollout's
    tokens, log-probs and embeddings equal those of the per-row-copy DynamicCache path (checked
    bit-for-bit in fp32 by tests/test_prefix.py) within bf16 noise, and are seeded-reproducible."""
    model, tok = tiny_backbone
    pr = ChatPrompter(tok)
    prompts = pr.encode(TEXTS)
    runs = []
    for share in (True, False):
        engine = HFRolloutEngine(model, tok, max_new_tokens=6, share_prompt_kv=share)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            runs.append(engine.generate(prompts, 2, 0.0, pr.system_len, seeds=[1, 2, 3]))
    a, b = runs
    assert torch.equal(a.response_ids, b.response_ids)  # greedy rows
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=5e-2, rtol=0)
    torch.testing.assert_close(a.pooled, b.pooled, atol=5e-2, rtol=5e-2)
