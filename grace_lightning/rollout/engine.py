"""Rollouts: sample rationales and take their embeddings from the same pass.

`HFRolloutEngine` is a small sampling loop on a Hugging Face causal LM, written for GRACE's shape
of work rather than calling ``model.generate``:

- each distinct prompt is prefilled ONCE and its KV cache expanded to the rows that sample from
  it (the K rollouts of a group share one prompt; most tokens are prompt tokens);
- every row has its own temperature, so a group's K rollouts (paper code: T=1.0) and its anchors
  (T=0.5) can share one batch;
- each generated token is fed back through the model anyway to get the next logits, so its
  last-layer hidden state is summed on the fly: the mean-pooled embedding (over prompt tokens
  after the system prompt + the response, notes §3.3) costs no extra forward pass;
- the sampled tokens' log-probs are kept (the PPO "old" log-probs come for free);
- finished rows are dropped from the batch as they end, so long stragglers run alone.

Another engine (vLLM, SGLang) can implement `RolloutEngine`; if it cannot return hidden states or
log-probs it leaves those fields ``None`` and the caller computes them with a scoring pass.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class RolloutBatch:
    """N sampled responses for P prompts (row r answers prompt ``row_to_prompt[r]``)."""

    prompt_ids: torch.Tensor  # (P, Lp) left-padded
    prompt_mask: torch.Tensor  # (P, Lp)
    row_to_prompt: torch.Tensor  # (N,)
    response_ids: torch.Tensor  # (N, R) right-padded with pad_id
    response_mask: torch.Tensor  # (N, R) 1 on generated tokens (EOS included)
    finished: torch.Tensor  # (N,) bool: ended with EOS (False = hit max_new_tokens)
    temperatures: torch.Tensor  # (N,)
    logprobs: torch.Tensor | None  # (N, R) log-prob of each sampled token at its temperature
    pooled: torch.Tensor | None  # (N, D) mean-pooled last-layer hidden states, float32

    @property
    def embeddings(self) -> torch.Tensor | None:  # (N, D) L2-normalised (the reward's h)
        return None if self.pooled is None else F.normalize(self.pooled, dim=-1)

    @property
    def lengths(self) -> torch.Tensor:  # (N,)
        return self.response_mask.sum(-1)

    @property
    def truncated(self) -> torch.Tensor:  # (N,) bool
        return ~self.finished

    def response_texts(self, tokenizer) -> list[str]:
        return [
            tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
            for ids, m in zip(self.response_ids, self.response_mask)
        ]


class RolloutEngine(Protocol):
    def generate(
        self,
        prompt_ids: list[list[int]],
        num_samples: int | list[int] = 1,
        temperature: float | list[float] = 1.0,
        system_len: int = 0,
        generator: torch.Generator | None = None,
        seeds: list[int] | None = None,
    ) -> RolloutBatch: ...


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and mask, padded on the left."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, length - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, length - len(s) :] = 1
    return ids.to(device), mask.to(device)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that follow the attention mask under left padding."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def pooling_mask(prompt_mask: torch.Tensor, system_len: int) -> torch.Tensor:
    """Prompt positions that enter the mean: valid tokens after the first ``system_len``."""
    return prompt_mask.bool() & (prompt_mask.cumsum(-1) > system_len)


def cache_kwarg(decoder) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` in 5.x; accept either."""
    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k / nucleus filtering; filtered entries become -inf. logits: (N, V)."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


class HFRolloutEngine:
    def __init__(
        self,
        model,
        tokenizer,
        max_new_tokens: int = 2048,
        top_p: float = 1.0,
        top_k: int = 0,
        eos_token_ids: list[int] | None = None,
        ignore_eos: bool = False,
    ):
        from grace_lightning.models.backbone import eos_token_ids as _eos

        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.top_p = top_p
        self.top_k = top_k
        self.eos_ids = eos_token_ids or _eos(model, tokenizer)
        self.ignore_eos = ignore_eos  # always run max_new_tokens (benchmarks; vLLM's ignore_eos)
        self.pad_id = tokenizer.pad_token_id

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[list[int]],
        num_samples: int | list[int] = 1,
        temperature: float | list[float] = 1.0,
        system_len: int = 0,
        generator: torch.Generator | None = None,
        seeds: list[int] | None = None,
    ) -> RolloutBatch:
        """Sample ``num_samples[p]`` responses to each prompt p at ``temperature[p]`` (0 = greedy).

        Randomness: with ``seeds`` (one per prompt) sample j of prompt p draws from its own
        stream seeded by (seeds[p], j), so a row's response depends on nothing else in the batch
        (evaluation caches, DDP runs equal to single-process ones); otherwise all rows share
        ``generator``. Either way sampling is inverse-CDF with one uniform per token.
        """
        from transformers import DynamicCache

        model = self.model
        device = next(model.parameters()).device
        decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
        cache_key = cache_kwarg(decoder)
        num_prompts = len(prompt_ids)
        counts = _per_prompt(num_samples, num_prompts, "num_samples")
        temps = torch.tensor(_per_prompt(temperature, num_prompts, "temperature"), device=device)
        row_to_prompt = torch.repeat_interleave(
            torch.arange(num_prompts, device=device), torch.tensor(counts, device=device)
        )
        n_rows, steps = row_to_prompt.numel(), self.max_new_tokens

        # 1. prefill each distinct prompt once
        p_ids, p_mask = left_pad(prompt_ids, self.pad_id, device)  # (P, Lp)
        cache = DynamicCache(config=model.config)
        out = decoder(
            input_ids=p_ids,
            attention_mask=p_mask,
            position_ids=positions_from_mask(p_mask),
            use_cache=True,
            **{cache_key: cache},
        )
        hidden = out.last_hidden_state.float()  # (P, Lp, D)
        pool = pooling_mask(p_mask, system_len)  # (P, Lp)
        prompt_sum = torch.where(pool[..., None], hidden, 0.0).sum(1)  # (P, D)
        last_logits = lm_head(out.last_hidden_state[:, -1])  # (P, V)

        # 2. expand to one row per sample; all loop state below lives in "active row" space
        cache.batch_select_indices(row_to_prompt)
        active = torch.arange(n_rows, device=device)  # full-row index of each active row
        attn = p_mask[row_to_prompt]  # (A, Lp + t)
        logits = last_logits[row_to_prompt].float()  # (A, V)
        next_pos = p_mask.sum(-1)[row_to_prompt]  # (A,)
        row_temp = temps[row_to_prompt]  # (N,)
        emb_sum = prompt_sum[row_to_prompt]  # (N, D)
        emb_count = pool.sum(-1)[row_to_prompt].float()  # (N,)
        resp = torch.full((n_rows, steps), self.pad_id, dtype=torch.long, device=device)
        resp_mask = torch.zeros((n_rows, steps), dtype=torch.long, device=device)
        logps = torch.zeros((n_rows, steps), device=device)
        finished = torch.zeros(n_rows, dtype=torch.bool, device=device)
        eos = torch.tensor(self.eos_ids, device=device)
        uniforms = None  # (N, steps) per-row streams, drawn up front on the CPU
        if seeds is not None:
            sample_idx = torch.cat([torch.arange(c) for c in counts]).tolist()
            row_seeds = [row_seed(seeds[p], j) for p, j in zip(row_to_prompt.tolist(), sample_idx)]
            uniforms = torch.stack(
                [torch.rand(steps, generator=torch.Generator().manual_seed(x)) for x in row_seeds]
            ).to(device, torch.float64)

        for t in range(steps):
            # 3. sample one token per active row at its own temperature
            temp = row_temp[active, None]
            greedy = temp <= 0  # temperature 0 = greedy decoding (ReMax's baseline rollout)
            scaled = logits / torch.where(greedy, 1.0, temp)
            logp_all = scaled.log_softmax(-1)  # (A, V)
            probs = filter_logits(scaled, self.top_k, self.top_p).softmax(-1)
            if uniforms is not None:
                u = uniforms[active, t]
            else:
                u = torch.rand(len(active), generator=generator, dtype=torch.float64)
                u = u.to(device)
            tok = sample_inverse_cdf(probs, u)  # (A,)
            tok = torch.where(greedy.squeeze(-1), scaled.argmax(-1), tok)
            resp[active, t] = tok
            resp_mask[active, t] = 1
            logps[active, t] = logp_all.gather(-1, tok[:, None]).squeeze(-1)
            ended = torch.isin(tok, eos) & (not self.ignore_eos)

            # 4. feed it back: next logits + its hidden state for the embedding
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=-1)
            out = decoder(
                input_ids=tok[:, None],
                attention_mask=attn,
                position_ids=next_pos[:, None],
                use_cache=True,
                **{cache_key: cache},
            )
            h = out.last_hidden_state[:, -1]  # (A, D)
            emb_sum[active] += h.float()
            emb_count[active] += 1
            next_pos = next_pos + 1
            finished[active[ended]] = True

            keep = ~ended
            if not keep.any() or t == steps - 1:
                break
            # 5. finished rows leave the batch, so long stragglers run alone
            if ended.any():
                idx = keep.nonzero().squeeze(-1)
                cache.batch_select_indices(idx)
                active, attn, h, next_pos = active[idx], attn[idx], h[idx], next_pos[idx]
            logits = lm_head(h).float()

        length = int(resp_mask.sum(-1).max().item()) if n_rows else 0
        pooled = emb_sum / emb_count.clamp(min=1)[:, None]
        return RolloutBatch(
            prompt_ids=p_ids,
            prompt_mask=p_mask,
            row_to_prompt=row_to_prompt,
            response_ids=resp[:, :length],
            response_mask=resp_mask[:, :length],
            finished=finished,
            temperatures=row_temp,
            logprobs=logps[:, :length],
            pooled=pooled,
        )


def sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The first token whose cumulative probability exceeds u. probs: (A, V), u: (A,) in [0, 1)."""
    cdf = probs.double().cumsum(-1)
    tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
    return tok.clamp(max=probs.size(-1) - 1)


def row_seed(seed: int, sample: int) -> int:
    """Seed of sample ``sample`` of a prompt whose seed is ``seed`` (63-bit, well mixed)."""
    digest = hashlib.sha256(f"{int(seed)}:{int(sample)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def text_seed(seed: int, text: str) -> int:
    """A per-text seed: the same text gets the same stream whatever batch it sits in."""
    digest = hashlib.sha256(f"{int(seed)}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _per_prompt(value, n: int, name: str) -> list:
    if isinstance(value, (int, float)):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
    return value
