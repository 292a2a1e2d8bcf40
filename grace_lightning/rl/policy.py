"""Per-token log-probs of sampled responses under the current policy (the loss pass).

The K responses of a group share one prompt. With ``share_prompt=True`` the prompt runs once (with
gradient) and its KV cache is expanded to the K rows, which then run only their response tokens;
gradients flow back into the prompt pass through the cache. A probe on a 2-core CPU at 4x8x64
tokens: forward+backward 71 s -> 16 s, same log-probs (max diff 2e-5). Gradient checkpointing
cannot checkpoint through a cache (transformers turns the cache off), so it uses the full-sequence
path, as does ``share_prompt=False``.

Memory: no ``(rows, length, vocab)`` logits tensor ever exists. `token_logprobs` takes the hidden
states of the response tokens that count (mask != 0), and runs LM head + fp32 upcast +
temperature + log-softmax over chunks of ``chunk_tokens`` of them. Under autograd each chunk is
wrapped in ``torch.utils.checkpoint``, so the forward keeps only the chunk's hidden states and the
backward recomputes one chunk's logits at a time: peak logits memory is a few
``chunk_tokens x vocab`` fp32 buffers (default ~256 MiB each, 441 tokens at Qwen2.5's 151,936)
instead of ``rows x length x vocab`` (paper_sup mini-batch: ~159 GB).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from grace_lightning.rollout.engine import cache_kwarg, positions_from_mask
from grace_lightning.rollout.kv import same_dtype_kv

LOGITS_CHUNK_BYTES = 256 * 2**20  # fp32 logits per chunk when chunk_tokens is None
DEFAULT_CHUNK_TOKENS = 512  # when the LM head's output size cannot be read


def response_logprobs(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    row_to_prompt: torch.Tensor,
    temperature: torch.Tensor | float = 1.0,
    *,
    share_prompt: bool = True,
    with_entropy: bool = False,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob (and optionally entropy) of each response token.

    prompt_ids/mask: (P, Lp) left-padded; response_ids/mask: (N, R) right-padded;
    row_to_prompt: (N,) prompt of each row; temperature: scalar or (N,).
    chunk_tokens: response tokens per LM-head chunk (see `token_logprobs`); None = auto.
    Returns (N, R) float32 log-probs and (N, R) float32 entropies (no grad) or None; both are
    zero where the mask is zero (those positions are never put through the LM head).
    """
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    checkpointing = _is_checkpointing(model) and torch.is_grad_enabled()
    if share_prompt and not checkpointing:
        hidden = _hidden_shared_prompt(
            decoder, prompt_ids, prompt_mask, response_ids, response_mask, row_to_prompt
        )
    else:
        hidden = _hidden_full_sequence(
            decoder, prompt_ids, prompt_mask, response_ids, response_mask, row_to_prompt
        )
    return token_logprobs(
        lm_head,
        hidden,
        response_ids,
        response_mask,
        temperature,
        chunk_tokens=chunk_tokens,
        with_entropy=with_entropy,
    )


def token_logprobs(
    lm_head: torch.nn.Module,
    hidden: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    temperature: torch.Tensor | float = 1.0,
    *,
    chunk_tokens: int | None = None,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(lm_head(hidden) / temperature)[ids], chunked over the active tokens.

    hidden: (N, R, D), position j predicts ids[:, j]; ids, mask: (N, R); temperature: scalar
    or (N,) per row (<= 0 means greedy and is scored at T=1, as the rollout engine does).
    chunk_tokens: active tokens per chunk; None = LOGITS_CHUNK_BYTES of fp32 logits.
    Gradients reach ``hidden`` and the LM head's parameters (recomputed per chunk in the
    backward under autograd). Entropy is computed in the forward only, without grad.
    Returns (N, R) float32 log-probs and entropies (or None), zero where mask == 0.
    """
    N, R, _ = hidden.shape
    active = mask.bool()  # (N, R)
    h = hidden[active]  # (T, D) the T tokens that count
    tok = ids[active]  # (T,)
    temp = torch.as_tensor(temperature, device=hidden.device).reshape(-1)  # (1,) or (N,)
    temp = torch.where(temp > 0, temp, torch.ones_like(temp))  # 0 = greedy: T=1, as the engine
    temp = temp.expand(N)[:, None].expand(N, R)[active]  # (T,)
    step = chunk_tokens if chunk_tokens is not None else _auto_chunk_tokens(lm_head)
    if step < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    params_need_grad = any(p.requires_grad for p in lm_head.parameters())
    recompute = torch.is_grad_enabled() and (h.requires_grad or params_need_grad)
    logps, ents = [], []
    for start in range(0, h.size(0), step):
        chunk = (h[start : start + step], tok[start : start + step], temp[start : start + step])
        sink: dict[str, torch.Tensor] = {}
        if recompute:  # keep only the chunk's inputs; the backward recomputes its logits
            lp = checkpoint(_chunk_logp, lm_head, *chunk, with_entropy, sink, use_reentrant=False)
        else:
            lp = _chunk_logp(lm_head, *chunk, with_entropy, sink)
        logps.append(lp)
        if with_entropy:
            ents.append(sink["entropy"])
    logp = _scatter(logps, active, hidden)
    entropy = _scatter(ents, active, hidden) if with_entropy else None
    return logp, entropy


def _chunk_logp(lm_head, h, ids, temp, with_entropy: bool, sink: dict) -> torch.Tensor:
    """h (C, D), ids (C,), temp (C,) -> (C,) log-probs; entropy (C,) into ``sink`` once."""
    logits = lm_head(h)  # (C, V) model dtype (bf16 under autocast)
    acc = torch.promote_types(logits.dtype, torch.float32)
    logits = logits.to(acc) / temp.to(acc)[:, None]  # (C, V) at least fp32
    lse = torch.logsumexp(logits, dim=-1)  # (C,)
    logp = logits.gather(-1, ids[:, None]).squeeze(-1) - lse  # (C,)
    if with_entropy and "entropy" not in sink:  # not again when checkpoint recomputes
        with torch.no_grad():
            log_p = logits - lse[:, None]  # (C, V)
            sink["entropy"] = -(log_p.exp() * log_p).sum(-1)  # (C,)
    return logp


def _scatter(values: list[torch.Tensor], active: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Chunks of (T,) values -> (N, R), zero where ``active`` is False (differentiable)."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    out = torch.zeros(active.shape, dtype=dtype, device=like.device)  # (N, R)
    if not values:
        return out
    return out.masked_scatter(active, torch.cat(values).to(dtype))


def _auto_chunk_tokens(lm_head) -> int:
    vocab = getattr(lm_head, "out_features", None)
    if vocab is None and isinstance(getattr(lm_head, "weight", None), torch.Tensor):
        vocab = lm_head.weight.shape[0]
    if not vocab:
        return DEFAULT_CHUNK_TOKENS
    return max(1, LOGITS_CHUNK_BYTES // (4 * int(vocab)))


def prefill_prompts(decoder, prompt_ids, prompt_mask):
    """One pass over the (P, Lp) left-padded prompts, with gradient when enabled.

    -> (last hidden states (P, Lp, D), the KV cache it filled, the decoder's cache kwarg name).
    `rl/joint.py` and `_hidden_shared_prompt` then gather the cache to the rows
    (``cache.batch_select_indices``, differentiable) and run the responses on it."""
    from transformers import DynamicCache

    cache = same_dtype_kv(DynamicCache(config=decoder.config))  # K in V's dtype (rollout/kv.py)
    key = cache_kwarg(decoder)
    out = decoder(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=positions_from_mask(prompt_mask),
        use_cache=True,
        **{key: cache},
    )
    return out.last_hidden_state, cache, key


def _hidden_shared_prompt(
    decoder, prompt_ids, prompt_mask, response_ids, response_mask, row_to_prompt
):
    """Prompt once per group, responses on the expanded cache. -> (N, R, D)"""
    prompt_hidden, cache, key = prefill_prompts(decoder, prompt_ids, prompt_mask)
    first = prompt_hidden[:, -1][row_to_prompt]  # (N, D): predicts response token 0
    # The second pass always runs, even for 1-token responses (then on one masked dummy token):
    # under sharded FSDP every rank must issue the same number of forwards (each all-gathers the
    # layers), whatever the lengths of its own rows.
    n = response_ids.size(1) - 1  # response tokens fed back (the last one predicts nothing scored)
    cache.batch_select_indices(row_to_prompt)  # differentiable gather of the prompt's K/V
    mask = prompt_mask[row_to_prompt]
    feed = response_ids[:, : max(n, 1)]  # (N, max(n, 1))
    feed_mask = response_mask[:, :n] if n else torch.zeros_like(feed)
    pos = mask.sum(-1, keepdim=True) + torch.arange(feed.size(1), device=feed.device)
    out = decoder(
        input_ids=feed,
        attention_mask=torch.cat([mask, feed_mask], dim=-1),
        position_ids=pos,
        use_cache=True,
        **{key: cache},
    )
    return torch.cat([first[:, None], out.last_hidden_state[:, :n]], dim=1)  # (N, 1 + n, D)


def _hidden_full_sequence(
    decoder, prompt_ids, prompt_mask, response_ids, response_mask, row_to_prompt
):
    """[left-padded prompt | right-padded response] in one pass. -> (N, R, D)"""
    ids = torch.cat([prompt_ids[row_to_prompt], response_ids], dim=-1)
    mask = torch.cat([prompt_mask[row_to_prompt], response_mask], dim=-1)
    out = decoder(
        input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False
    )
    lp = prompt_ids.size(1)
    return out.last_hidden_state[:, lp - 1 : lp - 1 + response_ids.size(1)]


def _is_checkpointing(model) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # new name first
        if hasattr(type(model), name) or hasattr(model, name):
            return bool(getattr(model, name))
    return False
