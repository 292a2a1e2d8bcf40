"""Analytic matrix FLOPs of a decoder-only LM and this machine's matmul throughput.

:class:`~grace_lightning.scale.Shape` (alias ``ModelShape``) + :func:`forward_flops` count a
forward pass's matrix FLOPs from the model's shape and token counts: ``2 * (linear params) * tokens`` for the projections and MLP,
``2 * 2 * heads * head_dim * (query, key) pairs`` for attention (QK^T and AV), and the LM head only
where logits are computed. Backward is counted as 2x forward. Element-wise work (norms, RoPE,
softmax, sampling) is not counted: this is the matmul roofline. Used by the startup step-time
estimate (grace_lightning/presets.py) and the benches (bench/_common.py re-exports it).
"""

from __future__ import annotations

import time

from grace_lightning.scale import Shape

# One shape class for the FLOP model and the memory model (grace_lightning/scale.py); the name
# ModelShape stays for the benches' imports.
ModelShape = Shape


def forward_flops(shape: ModelShape, tokens: int, attn_pairs: int, lm_head_tokens: int) -> int:
    """Matrix FLOPs of a forward pass.

    tokens: positions run through the body; attn_pairs: (query, key) pairs attended, summed over
    queries (a causal prefill of n tokens: n(n+1)/2; a decode step at context c: c);
    lm_head_tokens: positions whose logits are computed.
    """
    body = 2 * shape.layers * shape.layer_linear_params() * tokens  # LM head excluded
    attn = 2 * 2 * shape.heads * shape.head_dim * attn_pairs * shape.layers
    head = 2 * shape.hidden * shape.vocab * lm_head_tokens
    return body + attn + head


def causal_pairs(n: int, past: int = 0) -> int:
    """(query, key) pairs of ``n`` new tokens after ``past`` cached ones, causal."""
    return n * past + n * (n + 1) // 2


def prefill_flops(shape: ModelShape, lengths: list[int], logits: str = "last") -> int:
    """Prefill of prompts of the given lengths (unpadded). logits: "last" | "all" | "none"."""
    tokens = sum(lengths)
    head = {"last": len(lengths), "all": tokens, "none": 0}[logits]
    return forward_flops(shape, tokens, sum(causal_pairs(n) for n in lengths), head)


def decode_flops(shape: ModelShape, contexts: list[int], new_tokens: int) -> int:
    """``new_tokens`` one-token steps for rows starting at the given context lengths, logits each step."""
    pairs = sum(causal_pairs(new_tokens, c) for c in contexts)
    rows = len(contexts)
    return forward_flops(shape, rows * new_tokens, pairs, rows * new_tokens)


def sequences_flops(shape: ModelShape, prompts: list[int], new_tokens: int, logits: str) -> int:
    """Full sequences (prompt + ``new_tokens``) in one pass each, no KV reuse."""
    return prefill_flops(shape, [p + new_tokens for p in prompts], logits=logits)


def grace_step_flops(shape: ModelShape, policy: list[int], anchors: list[int], k: int, r: int):
    """GRACE step (rollout engine + shared-prompt loss pass), useful (unpadded) matrix FLOPs.

    policy / anchors: prompt lengths; k rollouts per policy prompt, one per anchor; r new tokens.
    Rollout: each distinct prompt prefilled once, then (len(policy) * k + len(anchors)) rows
    decode r tokens (embeddings pooled in the same pass: no extra FLOPs).
    Update: policy prompts once (shared prompt), each row's r - 1 fed response tokens on the
    expanded cache, logits at the r response positions; backward = 2x forward.
    """
    prompts = policy + anchors
    rows_ctx = [p for p in policy for _ in range(k)] + anchors
    rollout = prefill_flops(shape, prompts, "last") + decode_flops(shape, rows_ctx, r)
    # the decode loop computes logits for r - 1 fed tokens (the last token's are never needed);
    # close enough to count r: the difference is one LM-head row per sequence
    fwd = prefill_flops(shape, policy, "none")
    fwd += forward_flops(
        shape,
        len(policy) * k * (r - 1),
        sum(causal_pairs(r - 1, p) for p in policy for _ in range(k)),
        len(policy) * k * r,
    )
    return {"rollout": rollout, "update": 3 * fwd}


def contrastive_step_flops(shape: ModelShape, texts: list[int]) -> int:
    """Contrastive fine-tuning step (InfoNCE / SimCSE): every text of the batch (its prompt
    lengths; SimCSE lists each sentence twice, one per dropout view) in one forward pass without
    logits (the embedding is pooled hidden states); backward = 2x forward."""
    return 3 * prefill_flops(shape, texts, "none")


def matmul_gflops(m: int, k: int, n: int, dtype, min_seconds: float = 0.25) -> float:
    """Achieved GFLOP/s of ``(m, k) @ (k, n)`` in ``dtype`` (after one warm-up call)."""
    import torch

    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    torch.matmul(a, b)
    reps, t0 = 0, time.perf_counter()
    while True:
        torch.matmul(a, b)
        reps += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return 2 * m * k * n * reps / elapsed / 1e9
