"""Peak memory of the policy update (rl/update.py) grows with the micro-batch, not the mini-batch.

Measured with `tests.probes.LiveTensorBytes` (bytes of live tensor storages created inside the
update: forward, backward, gradients; weights excluded): deterministic, so margins can be exact.
The model is a random-init 2-layer Llama with Qwen2.5's vocabulary (151,936) and hidden 64; its
tied embedding / LM head is frozen, so no (V, D) gradient buffer hides the per-row memory. Two
shapes, each with per-row memory that dominates a 2-row micro-batch's peak:

- ``logits``: shared-prompt path (the default), 4-token responses. A row's memory is mostly the
  fp32 logits of its tokens (4 x 151,936 x 4 B per buffer; a micro-batch stays below the LM
  head's chunk cap of 441 tokens, so the chunk grows with the micro-batch's tokens);
- ``activations``: full-sequence path, 192-token prompts and 1-token responses, eager attention
  with 16 heads. A row's memory is its decoder activations (attention probabilities and MLP
  inputs); the LM head sees one token per row (peaks measured the same with 1-token chunks).

Measured (LiveTensorBytes, MiB; mini 16 rows / micro 2 | mini 32 / micro 2 | mini 16 / micro 8 |
mini 16 unsplit): logits 24.0 | 24.1 | 94.2 | 187.4; activations 21.7 | 21.7 | 85.4 | 170.0.
"""

from __future__ import annotations

import pytest
import torch

from grace_lightning.rl.update import PolicyUpdater, UpdateConfig, UpdateHooks
from grace_lightning.rollout.engine import RolloutBatch
from tests.probes import LiveTensorBytes

VOCAB = 151_936  # Qwen2.5
K = 4  # rollouts per group: a 16-row mini-batch is 4 groups

# name -> (prompt tokens, response tokens, share_prompt)
SHAPES = {"logits": (16, 4, True), "activations": (192, 1, False)}


@pytest.fixture
def one_thread():
    """Small matmuls: threads only add contention (the numbers do not depend on them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=16,  # head_dim 4: attention probabilities dominate the activations
        num_key_value_heads=16,
        tie_word_embeddings=True,
        attn_implementation="eager",  # keeps (rows, heads, L, L) probabilities for the backward
    )
    policy = LlamaForCausalLM(cfg).train()
    policy.get_input_embeddings().weight.requires_grad_(False)  # tied: the LM head too
    assert not policy.get_output_embeddings().weight.requires_grad
    return policy


def fake_rollouts(rows: int, prompt_len: int, response_len: int) -> RolloutBatch:
    """rows // K prompts with K random responses each, every token active."""
    g = torch.Generator().manual_seed(0)
    prompts = rows // K
    prompt_ids = torch.randint(3, VOCAB, (prompts, prompt_len), generator=g)
    response_ids = torch.randint(3, VOCAB, (rows, response_len), generator=g)
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=torch.ones_like(prompt_ids),
        row_to_prompt=torch.arange(prompts).repeat_interleave(K),
        response_ids=response_ids,
        response_mask=torch.ones_like(response_ids),
        finished=torch.ones(rows, dtype=torch.bool),
        temperatures=torch.full((rows,), 0.9),
        logprobs=-5.0 * torch.rand(rows, response_len, generator=g),  # old log-probs
        pooled=None,
    )


def update_peak(model, shape: str, rows: int, **split) -> int:
    """Peak live tensor bytes of one PolicyUpdater.update: one mini-batch of ``rows`` rows."""
    prompt_len, response_len, share_prompt = SHAPES[shape]
    ro = fake_rollouts(rows, prompt_len, response_len)
    advantages = torch.randn(rows, generator=torch.Generator().manual_seed(1))
    cfg = UpdateConfig(
        num_generations=K,
        prompts_per_minibatch=rows // K,  # the rollout batch is one mini-batch (one step)
        max_completion_length=response_len,
        share_prompt=share_prompt,
        **split,
    )
    steps = []
    hooks = UpdateHooks(
        zero_grad=lambda: model.zero_grad(set_to_none=True), step=lambda: steps.append(1)
    )
    with LiveTensorBytes() as mem:
        PolicyUpdater(cfg, model, hooks).update(ro, advantages, torch.ones(rows))
    assert steps == [1], "one optimiser step per update"
    return mem.peak


@pytest.mark.parametrize("shape", list(SHAPES))
def test_update_peak_memory_grows_with_the_micro_batch_not_the_mini_batch(model, shape, one_thread):
    prompt_len, response_len, _ = SHAPES[shape]
    micro2 = update_peak(model, shape, 16, micro_batch_size=2)
    micro2_big = update_peak(model, shape, 32, micro_batch_size=2)  # twice the mini-batch
    micro8 = update_peak(model, shape, 16, micro_batch_size=8)
    unsplit = update_peak(model, shape, 16)
    # a token budget of two rows packs the same 2-row micro-batches: the budget counts the
    # padded rectangle the loss pass runs (rl/update.py padded_tokens), on the shared-prompt
    # path one prompt + 2 responses (a third row would add a response: over budget)
    share_prompt = SHAPES[shape][2]
    two_rows = prompt_len + 2 * response_len if share_prompt else 2 * (prompt_len + response_len)
    budget = update_peak(model, shape, 16, max_tokens_per_micro_batch=two_rows)
    mib = {
        k: round(v / 2**20, 1)
        for k, v in dict(
            micro2=micro2, micro2_big=micro2_big, micro8=micro8, unsplit=unsplit, budget=budget
        ).items()
    }

    per_row = (micro8 - micro2) / 6  # bytes a row adds to a micro-batch
    # the shape makes rows visible: six more rows in a micro-batch at least double its peak
    assert 6 * per_row > micro2, mib
    # doubling the mini-batch at the same micro-batch adds less than half a row (a few (N, R)
    # tensors of the whole rollout batch: masks, old log-probs); without micro-batching (one
    # pass over the mini-batch) it would add 16 rows, and micro2 would equal unsplit. Checked
    # with PolicyUpdater.plan patched to one micro-batch per mini-batch: logits micro2 = micro8
    # = unsplit = 187.4 MiB, micro2_big = 374.9 MiB (activations 170.0 / 339.7): these fail.
    assert abs(micro2_big - micro2) < 0.5 * per_row, mib
    assert abs(micro2_big - micro2) < 0.1 * micro2, mib
    # the unsplit mini-batch holds all its rows at once: clearly more
    assert unsplit > 3 * micro2, mib
    # growth is proportional to the micro-batch's rows: 2 -> 8 and 8 -> 16 rows, same slope
    assert (unsplit - micro8) / 8 == pytest.approx(per_row, rel=0.25), mib
    # the token budget bounds the peak as the row cap does
    assert budget == pytest.approx(micro2, rel=0.1), mib
