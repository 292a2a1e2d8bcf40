"""Chunked loss-pass log-probs (`rl.policy`): same numbers and gradients as the naive full-logits
computation, and a peak memory that does not grow with rows x length x vocab."""

from __future__ import annotations

import copy

import pytest
import torch

from grace_lightning.rl.policy import response_logprobs, token_logprobs
from tests.probes import LiveTensorBytes


def _batch(vocab: int, P=2, K=3, Lp=6, R=9, seed=0):
    """Random prompts (left-padded), right-padded responses of lengths 1..R, per-row temps."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab, (P, Lp), generator=g)
    prompt_mask = torch.ones(P, Lp, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding on prompt 0
    N = P * K
    lengths = torch.tensor([R, 1, 5, R - 2, 3, R])[:N]
    response_mask = (torch.arange(R) < lengths[:, None]).long()  # (N, R)
    response_ids = torch.randint(3, vocab, (N, R), generator=g) * response_mask
    row_to_prompt = torch.arange(P).repeat_interleave(K)
    temps = torch.tensor([1.0, 0.7, 1.3, 0.5, 1.0, 0.9])[:N]
    return prompt_ids, prompt_mask, response_ids, response_mask, row_to_prompt, temps


def _naive(model, prompt_ids, prompt_mask, response_ids, response_mask, row_to_prompt, temps):
    """The old implementation: full (N, L, V) fp32 logits of [prompt | response], log-softmax."""
    ids = torch.cat([prompt_ids[row_to_prompt], response_ids], dim=-1)
    mask = torch.cat([prompt_mask[row_to_prompt], response_mask], dim=-1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    lp = prompt_ids.size(1)
    logits = logits[:, lp - 1 : lp - 1 + response_ids.size(1)] / temps[:, None, None]  # (N,R,V)
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, response_ids[..., None]).squeeze(-1) * response_mask
    entropy = -(logp_all.exp() * logp_all).sum(-1) * response_mask
    return logp, entropy.detach()


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize(
    "share_prompt, chunk_tokens", [(True, 3), (False, 7), (True, None), (False, 10**6)]
)
def test_chunked_logprobs_entropy_and_grads_equal_full_logits(
    tiny_backbone, share_prompt, chunk_tokens
):
    model, _ = tiny_backbone
    batch = _batch(model.config.vocab_size)
    mask = batch[3]
    # upstream-style loss with distinct weights per token, so every log-prob's gradient counts
    weights = torch.linspace(-1.0, 2.0, mask.numel()).reshape(mask.shape)

    model.zero_grad(set_to_none=True)
    ref_logp, ref_ent = _naive(model, *batch)
    (ref_logp * weights).sum().backward()
    ref_grads = _grads(model).clone()

    model.zero_grad(set_to_none=True)
    logp, ent = response_logprobs(
        model, *batch, share_prompt=share_prompt, with_entropy=True, chunk_tokens=chunk_tokens
    )
    (logp * weights).sum().backward()
    grads = _grads(model).clone()
    model.zero_grad(set_to_none=True)

    assert logp.dtype == ent.dtype == torch.float32 and not ent.requires_grad
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    assert (logp[mask == 0] == 0).all() and (ent[mask == 0] == 0).all()
    assert grads.shape == ref_grads.shape
    rel = ((grads - ref_grads).norm() / ref_grads.norm()).item()
    assert rel < 1e-5, rel


def test_no_grad_pass_and_scalar_temperature(tiny_backbone):
    model, _ = tiny_backbone
    prompt_ids, prompt_mask, response_ids, response_mask, row_to_prompt, _ = _batch(
        model.config.vocab_size
    )
    temps = torch.full((len(response_ids),), 0.8)
    with torch.no_grad():
        ref, _ = _naive(
            model, prompt_ids, prompt_mask, response_ids, response_mask, row_to_prompt, temps
        )
        for t in (0.8, torch.tensor(0.8), temps):
            logp, ent = response_logprobs(
                model,
                prompt_ids,
                prompt_mask,
                response_ids,
                response_mask,
                row_to_prompt,
                t,
                chunk_tokens=4,
            )
            assert ent is None and not logp.requires_grad
            torch.testing.assert_close(logp, ref, atol=1e-5, rtol=1e-5)


def test_greedy_rows_are_scored_at_temperature_one(tiny_backbone):
    # temperature 0 marks a greedy row (ReMax); the engine scores it at T=1, so do we (no inf)
    model, _ = tiny_backbone
    *batch, temps = _batch(model.config.vocab_size)
    with torch.no_grad():
        ref, _ = _naive(model, *batch, torch.where(temps == 0.7, 1.0, temps))
        logp, _ = response_logprobs(model, *batch, torch.where(temps == 0.7, 0.0, temps))
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_path_matches(tiny_backbone):
    model = copy.deepcopy(tiny_backbone[0]).train()  # the fixture must not be mutated
    model.config.use_cache = False
    model.gradient_checkpointing_enable()  # as module.py
    batch = _batch(model.config.vocab_size)
    ref, _ = _naive(model, *batch)
    ref.sum().backward()
    ref_grads = _grads(model).clone()
    model.zero_grad(set_to_none=True)
    logp, _ = response_logprobs(model, *batch, chunk_tokens=5)  # full-sequence path
    logp.sum().backward()
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=1e-5)
    assert ((_grads(model) - ref_grads).norm() / ref_grads.norm()).item() < 1e-5


def test_token_logprobs_gradient_reaches_hidden_and_lm_head():
    # float64 Linear head with a bias: gradients w.r.t. hidden, weight and bias equal the
    # naive ones to 1e-12 (checkpoint recomputation is exact)
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(5, 13, dtype=torch.float64)
    hidden = torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 13, (3, 4), generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    temps = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64)

    def grads(fn):
        head.zero_grad()
        hidden.grad = None
        (fn() * w).sum().backward()
        return [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]

    def naive():
        logp = (head(hidden) / temps[:, None, None]).log_softmax(-1)
        return logp.gather(-1, ids[..., None]).squeeze(-1) * mask

    expected = grads(naive)
    for chunk in (1, 2, 100):
        got = grads(
            lambda c=chunk: token_logprobs(head, hidden, ids, mask, temps, chunk_tokens=c)[0]
        )
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="chunk_tokens"):
        token_logprobs(head, hidden, ids, mask, chunk_tokens=0)


def _big_vocab_model():
    """Random-init tiny Llama with Qwen2.5's vocabulary (151,936), hidden 16, one layer; the
    input embedding is frozen so that the LM head's weight gradient is the only (V, D) one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=151_936,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.get_input_embeddings().weight.requires_grad_(False)
    return model


def _peak_fwd_bwd(model, rows: int, length: int, chunk_tokens: int) -> int:
    """Peak live tensor bytes of response_logprobs + backward over rows x length tokens."""
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    P = 2
    prompt_ids = torch.randint(0, V, (P, 8), generator=g)
    response_ids = torch.randint(0, V, (rows, length), generator=g)
    model.zero_grad(set_to_none=True)
    with LiveTensorBytes() as mem:
        logp, _ = response_logprobs(
            model,
            prompt_ids,
            torch.ones_like(prompt_ids),
            response_ids,
            torch.ones_like(response_ids),
            torch.arange(rows) % P,
            torch.full((rows,), 0.7),
            with_entropy=True,
            chunk_tokens=chunk_tokens,
        )
        logp.sum().backward()
    assert model.lm_head.weight.grad is not None
    model.zero_grad(set_to_none=True)
    return mem.peak


def test_peak_memory_does_not_grow_with_rows_times_vocab():
    model = _big_vocab_model()
    V = model.config.vocab_size
    logits_bytes = lambda tokens: tokens * V * 4  # noqa: E731 - one fp32 (tokens, V) tensor
    # the tracker sees the logits: unchunked (one chunk of 64 tokens), the forward+backward
    # holds several (64, V) fp32 tensors at once (measured: 6)
    unchunked = _peak_fwd_bwd(model, rows=2, length=32, chunk_tokens=10**9)
    assert unchunked > 3 * logits_bytes(64), (unchunked, logits_bytes(64))
    # chunks of 16 tokens: 64 and 256 response tokens peak (almost) alike, far below the fp32
    # logits of 256 tokens (148 MiB). What remains is per chunk (a few (16, V) buffers) and per
    # weight (the LM head's (V, D) gradient and its accumulation buffer), not per token.
    small = _peak_fwd_bwd(model, rows=2, length=32, chunk_tokens=16)
    large = _peak_fwd_bwd(model, rows=8, length=32, chunk_tokens=16)
    assert large < 0.5 * logits_bytes(256), (large, logits_bytes(256))
    assert large - small < 0.05 * (logits_bytes(256) - logits_bytes(64)), (small, large)


def test_one_token_responses_run_the_same_two_forwards(tiny_backbone):
    """A micro-batch whose responses are all one token still runs the response pass (on a masked
    dummy token): under sharded FSDP a rank that skipped it would issue one forward (one set of
    all-gathers) fewer than a rank with longer rows, and the collectives would pair wrongly."""
    model, _ = tiny_backbone
    prompt_ids, prompt_mask, response_ids, response_mask, row_to_prompt, temps = _batch(
        model.config.vocab_size, R=1
    )
    calls = []
    hook = model.get_decoder().register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            ref, _ = _naive(
                model, prompt_ids, prompt_mask, response_ids, response_mask, row_to_prompt, temps
            )
            calls.clear()
            logp, _ = response_logprobs(
                model, prompt_ids, prompt_mask, response_ids, response_mask, row_to_prompt, temps
            )
    finally:
        hook.remove()
    assert logp.shape == (len(response_ids), 1)
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=1e-5)
    assert len(calls) == 2  # prompt pass + response pass, as for longer responses
