"""Evaluation-time rationale sampling: one rationale per text, seeded per text.

Training samples with :class:`grace_lightning.rollout.engine.HFRolloutEngine`, whose rows share
one ``torch.Generator``: a text's rationale then depends on the other texts in its batch. For
evaluation we want a text's rationale to depend only on (model, text, settings, seed), whatever
the batch, so that results and the rationale cache do not depend on batch size or task order.
This loop is the engine's (same prefill, KV cache, on-the-fly pooling over prompt[system_len:] +
response with EOS included, finished rows leaving the batch, same helpers) with two changes:

- every row samples with its own uniforms from a ``torch.Generator`` seeded by :func:`text_seed`
  (inverse-CDF sampling: exact, one uniform per token, nothing per row inside the loop);
- the pooled embedding is returned *unnormalised*, like base mode and upstream's eval
  (``eval_mteb.py`` does not L2-normalise; cosine similarity does not care, k-means and
  logistic regression see the same vectors in Base and "w/ reasoning" rows).

Upstream's eval samples with vLLM, temperature 1.0, top_p 1.0, max 2048 new tokens (notes §4).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from grace_lightning.rollout.engine import (
    cache_kwarg,
    filter_logits,
    left_pad,
    pooling_mask,
    positions_from_mask,
)


def text_seed(seed: int, text: str) -> int:
    """Per-text sampling seed: a 63-bit hash of (seed, text)."""
    digest = hashlib.sha256(f"{int(seed)}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class Rationales:
    response_ids: list[list[int]]  # generated ids per text (EOS included when finished)
    finished: list[bool]  # ended with EOS (False: hit max_new_tokens)
    pooled: torch.Tensor  # (N, D) float32 mean over prompt[system_len:] + response, on CPU


@torch.no_grad()
def sample_rationales(
    model,
    prompt_ids: list[list[int]],
    seeds: list[int],
    *,
    system_len: int,
    pad_id: int,
    eos_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
) -> Rationales:
    """Sample one rationale per prompt; row i uses ``torch.Generator().manual_seed(seeds[i])``.

    ``temperature <= 0`` means greedy decoding. ``eos_ids=[]`` never stops early (benchmarks).
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    n = len(prompt_ids)
    if n == 0:
        return Rationales([], [], torch.empty(0))
    # each row's uniforms come from its own CPU generator, drawn up front: device-independent,
    # and no per-row work inside the loop (inverse-CDF sampling below)
    uniforms = torch.stack(
        [torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    ).to(device, torch.float64)  # (N, R)

    ids, mask = left_pad(prompt_ids, pad_id, device)
    cache = DynamicCache(config=model.config)
    out = decoder(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions_from_mask(mask),
        use_cache=True,
        **{cache_kwarg(decoder): cache},
    )
    pool = pooling_mask(mask, system_len)
    emb_sum = torch.where(pool[..., None], out.last_hidden_state.float(), 0.0).sum(1)  # (N, D)
    emb_count = pool.sum(-1).float()  # (N,)
    logits = lm_head(out.last_hidden_state[:, -1]).float()  # (A, V)

    active = torch.arange(n, device=device)
    attn, next_pos = mask, mask.sum(-1)
    resp = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)

    for t in range(max_new_tokens):
        if temperature <= 0:
            tok = logits.argmax(-1)
        else:  # inverse CDF: the first token whose cumulative probability exceeds u
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            cdf = probs.double().cumsum(-1)
            u = uniforms[active, t, None] * cdf[:, -1:]
            tok = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.size(-1) - 1)
        resp[active, t] = tok
        lengths[active] += 1
        ended = torch.isin(tok, eos)
        finished[active[ended]] = True

        # feed the token back: its hidden state joins the mean, its logits give the next token
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=-1)
        out = decoder(
            input_ids=tok[:, None],
            attention_mask=attn,
            position_ids=next_pos[:, None],
            use_cache=True,
            **{cache_kwarg(decoder): cache},
        )
        h = out.last_hidden_state[:, -1]
        emb_sum[active] += h.float()
        emb_count[active] += 1
        next_pos = next_pos + 1

        keep = ~ended
        if not keep.any() or t == max_new_tokens - 1:
            break
        if ended.any():  # finished rows leave the batch
            idx = keep.nonzero().squeeze(-1)
            cache.batch_select_indices(idx)
            active, attn, h, next_pos = active[idx], attn[idx], h[idx], next_pos[idx]
        logits = lm_head(h).float()

    pooled = (emb_sum / emb_count.clamp(min=1)[:, None]).cpu()
    resp, lengths = resp.cpu(), lengths.cpu()
    return Rationales(
        response_ids=[resp[i, : lengths[i]].tolist() for i in range(n)],
        finished=finished.cpu().tolist(),
        pooled=pooled,
    )
