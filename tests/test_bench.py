"""The bench helpers (bench/_common.py): ISA parsing and the analytic FLOP counter.

The FLOP counter is checked against torch's own ``FlopCounterMode`` on a small Llama run with
eager attention (which multiplies the full (query, key) square, masked or not), so the count's
linear, attention and LM-head terms are each exercised. No timings here (those live in bench/).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import _common as common  # noqa: E402

CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8 avx512_fp16

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8 avx512_fp16
"""

EPYC = """\
processor\t: 0
model name\t: AMD EPYC 7B13 64-Core Processor
flags\t\t: fpu sse sse2 avx avx2 fma
"""


def test_parse_cpuinfo_intel_amx():
    info = common.parse_cpuinfo(CPUINFO)
    assert info["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert info["cores"] == 2
    assert info["flags"] == [
        "amx_bf16",
        "amx_int8",
        "amx_tile",
        "avx512_bf16",
        "avx512_fp16",
        "avx512f",
        "avx2",
    ]
    assert common.has_amx_bf16(info)


def test_parse_cpuinfo_without_amx():
    info = common.parse_cpuinfo(EPYC)
    assert info["model"].startswith("AMD EPYC")
    assert info["flags"] == ["avx2"]  # "avx" alone is not in the list; "avx2" is
    assert not common.has_amx_bf16(info)
    assert "avx2" in common.describe_cpu(info)


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,  # != hidden / heads: the count must use head_dim
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def counted(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as mode, torch.no_grad():
        fn()
    return mode.get_total_flops()


def test_prefill_flops_match_torch_counter(llama):
    shape = common.ModelShape.from_hf_config(llama.config)
    assert shape.head_dim == 24 and shape.kv_heads == 2
    b, n = 3, 11
    ids = torch.randint(0, 320, (b, n))
    got = counted(lambda: llama(input_ids=ids))  # logits at every position
    # eager attention computes the whole n x n square: pairs = n * n per row
    assert common.forward_flops(shape, b * n, b * n * n, b * n) == got
    # the body alone (no LM head): the decoder
    got_body = counted(lambda: llama.get_decoder()(input_ids=ids))
    assert common.forward_flops(shape, b * n, b * n * n, 0) == got_body


def test_decode_flops_match_torch_counter(llama):
    from transformers import DynamicCache

    from grace_lightning.rollout.engine import cache_kwarg

    shape = common.ModelShape.from_hf_config(llama.config)
    b, n, steps = 2, 7, 3
    ids = torch.randint(0, 320, (b, n))
    cache, key = DynamicCache(config=llama.config), cache_kwarg(llama)
    with torch.no_grad():
        llama(input_ids=ids, use_cache=True, **{key: cache})

    def decode():
        for _ in range(steps):
            llama(input_ids=ids[:, :1], use_cache=True, **{key: cache})

    # one new token at context c attends c + 1 keys: exactly the causal count
    assert common.decode_flops(shape, [n] * b, steps) == counted(decode)


def test_contrastive_step_flops_match_torch_counter(llama):
    """A contrastive step (the startup estimate of method=infonce|simcse): the decoder over every
    text, no LM head, forward + backward = 3x the forward's matrix FLOPs, as torch counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    from grace_lightning.flops import contrastive_step_flops

    shape = common.ModelShape.from_hf_config(llama.config)
    b, n = 3, 11
    ids = torch.randint(0, 320, (b, n))
    with FlopCounterMode(display=False) as mode:
        llama.get_decoder()(input_ids=ids).last_hidden_state.mean().backward()
    llama.zero_grad(set_to_none=True)
    # eager attention multiplies the whole n x n square; the estimate counts causal pairs
    assert 3 * common.forward_flops(shape, b * n, b * n * n, 0) == mode.get_total_flops()
    causal = 3 * common.forward_flops(shape, b * n, b * common.causal_pairs(n), 0)
    assert contrastive_step_flops(shape, [n] * b) == causal


def test_grace_step_counts_shared_prompt_once():
    shape = common.ModelShape(
        name="toy",
        arch="llama",
        hidden=8,
        layers=1,
        heads=2,
        kv_heads=1,
        head_dim=4,
        intermediate=16,
        vocab=10,
    )
    policy, anchors, k, r = [20, 30], [5, 6, 7, 8], 4, 3
    grace = common.grace_step_flops(shape, policy, anchors, k, r)
    trl = common.trl_step_flops(shape, policy, anchors, k, r)
    # the engine prefills each policy prompt once; TRL's generate prefills it k times
    once = common.prefill_flops(shape, policy, "last")
    assert grace["rollout"] - common.prefill_flops(shape, anchors, "last") == (
        once + common.decode_flops(shape, [p for p in policy for _ in range(k)] + anchors, r)
    )
    assert trl["rollout"] > grace["rollout"] - common.prefill_flops(shape, anchors, "last")
    assert trl["update"] > grace["update"] > 0
