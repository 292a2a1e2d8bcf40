"""Rollouts: sample rationales and take their embeddings from the same pass.

`HFRolloutEngine` is a small sampling loop on a Hugging Face causal LM, written for GRACE's shape
of work rather than calling ``model.generate``:

- the system prompt + chat header every prompt starts with is run once (batch 1) and each
  distinct prompt's remaining tokens are prefilled ONCE; the K rollouts of a group then read that
  single copy of the prompt KV (`rollout.kv.SegmentedCache`: [shared prefix | prompt | row]);
- every row has its own temperature, so a group's K rollouts (paper code: T=1.0) and its anchors
  (T=0.5) can share one batch;
- each generated token is fed back through the model anyway to get the next logits, so its
  last-layer hidden state is summed on the fly: the mean-pooled embedding (over prompt tokens
  after the system prompt + the response, notes §3.3) costs no extra forward pass;
- the sampled tokens' log-probs are kept (the PPO "old" log-probs come for free);
- finished rows are dropped from the batch as they end, so long stragglers run alone;
- a row budget and/or a KV-token budget splits a large request into sub-batches sampled one after
  another (`rollout.budget`), whole prompts with all their samples where they fit.

Memory (KV cache, per cached token position: 2 x layers x kv_heads x head_dim x bytes; Qwen2.5-1.5B
bf16: 28 KiB). The paper's rollout batch, 64 prompts x 8 + 128 anchors = 640 rows from 192 prompts
of <= 1024 tokens, 2048 response tokens:

- per-row copies (transformers ``DynamicCache`` + ``batch_select_indices``, ``share_prompt_kv=
  False``): 640 x (1024 + 2048) = 1.97M positions = 56 GB;
- shared prompt KV (default): 192 x 1024 + 640 x 2048 = 1.51M = 43 GB (-23%); the response part
  is per row by nature and dominates; the prompt part shrinks K-fold. The shared ~40-token system
  prefix saves a further 191 x 40 positions (0.2 GB) and ~40 tokens of prefill per prompt;
- ``max_rows_per_batch=128``: 16 x 1024 + 128 x 2048 = 0.28M positions (16 policy groups) to
  128 x 3072 = 0.39M (128 anchors), 8-11 GB per sub-batch, 5 sub-batches; ``max_kv_tokens=400000``
  bounds the same directly, whatever the mix.

Attention kernels (SDPA, eager, flash) take one dense ``(rows, heads, length, head_dim)`` key
tensor, so each layer's keys are assembled per decode step for that layer only (one layer's
transient, the same copy ``DynamicCache``'s ``torch.cat`` makes every step). Removing that too
needs a paged/varlen kernel (vLLM's PagedAttention, flash-attn's ``flash_attn_with_kvcache`` with
a block table), which is GPU-only.

Reproducibility: with ``seeds`` every row draws from its own stream, so results do not depend on
the batch split. Shared vs per-row-copied prompt KV is bit-identical (same shapes, same kernels).
Sub-batching and the shared prefix change matmul/attention shapes, which moves logits by ~1e-5;
log-probs and embeddings then agree to ~1e-5, but inverse-CDF sampling over the unsorted
vocabulary turns such noise into a different token with probability sum_i |CDF_i - CDF'_i|
(measured on SmolLM2: ~1% per sampled token at T=1; greedy rows are unaffected). The same holds,
and held before, for a row sampled alone vs. in a mixed batch. Gumbel-max sampling with
counter-based per-(row, step, token) noise would make flips ~1e-5 rarer (not done: it changes
every seeded rationale and the exported model's copy of the sampler).

Another engine (vLLM, SGLang) can implement `RolloutEngine`; if it cannot return hidden states or
log-probs it leaves those fields ``None`` and the caller computes them with a scoring pass.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from grace_lightning.rollout.budget import Piece, check_budget, plan_batches
from grace_lightning.rollout.kv import (
    SegmentedCache,
    num_layers,
    prefix_kv,
    same_dtype_kv,
    shared_prefix_len,
    suffix_batch,
    supports_segmented_cache,
)
from grace_lightning.rollout.padding import left_pad, pooling_mask, positions_from_mask

__all__ = [
    "HFRolloutEngine",
    "RolloutBatch",
    "RolloutEngine",
    "cache_kwarg",
    "filter_logits",
    "left_pad",
    "pooling_mask",
    "positions_from_mask",
    "row_seed",
    "text_seed",
]


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
    # (N, R) the sampler's own log-prob of each token when it is not the scoring model
    # (rollout.engine=vllm: vLLM's; `logprobs` then come from the training model's pass)
    sampler_logprobs: torch.Tensor | None = None

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
        progress: ProgressFn | None = None,
    ) -> RolloutBatch: ...


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
    """GRACE's sampler on a Hugging Face causal LM (see the module docstring).

    Memory knobs (all results are identical with any setting; tested in tests/test_rollout.py and
    tests/test_prefix.py):

    - ``max_rows_per_batch`` / ``max_kv_tokens``: sample the request in sub-batches of at most
      that many rows / cached token positions (`rollout.budget.kv_cost`), one after another, and
      concatenate them. ``None`` = no limit. A KV budget below one prompt + ``max_new_tokens``
      raises ``ValueError`` (at construction when ``max_prompt_tokens`` is given).
    - ``share_prompt_kv``: the K rows of a prompt read its KV from one copy (`rollout.kv`)
      instead of K copies; ``False`` = transformers' ``DynamicCache`` with per-row copies.
    - ``share_prefix``: the system prompt + chat header every prompt starts with is run once
      (batch 1) and its KV shared by every prompt; needs ``share_prompt_kv``.
    - ``progress`` / ``progress_every``: ``progress(rows_finished, rows_total, tokens_generated,
      elapsed_s)`` is called every ``progress_every`` decode steps and at the end of each
      sub-batch (`callbacks.progress.RolloutProgress` puts it on the progress bar).
    """

    def __init__(
        self,
        model,
        tokenizer,
        max_new_tokens: int = 2048,
        top_p: float = 1.0,
        top_k: int = 0,
        eos_token_ids: list[int] | None = None,
        ignore_eos: bool = False,
        max_rows_per_batch: int | None = None,
        max_kv_tokens: int | None = None,
        share_prompt_kv: bool = True,
        share_prefix: bool = True,
        max_prompt_tokens: int | None = None,
        progress: ProgressFn | None = None,
        progress_every: int = 16,
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
        self.max_rows_per_batch = max_rows_per_batch  # None = no limit
        self.max_kv_tokens = max_kv_tokens
        self.share_prompt_kv = share_prompt_kv
        self.share_prefix = share_prefix
        self.progress = progress
        self.progress_every = max(1, int(progress_every))
        self.last_plan: list[list[Piece]] = []
        # fail at startup, not after the first rollout: the longest allowed prompt must fit
        check_budget(self.max_rows_per_batch, self.max_kv_tokens, max_prompt_tokens or 0, 0)
        if max_prompt_tokens:
            check_budget(None, self.max_kv_tokens, max_prompt_tokens, max_new_tokens)

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[list[int]],
        num_samples: int | list[int] = 1,
        temperature: float | list[float] = 1.0,
        system_len: int = 0,
        generator: torch.Generator | None = None,
        seeds: list[int] | None = None,
        progress: ProgressFn | None = None,
    ) -> RolloutBatch:
        """Sample ``num_samples[p]`` responses to each prompt p at ``temperature[p]`` (0 = greedy).

        Randomness: with ``seeds`` (one per prompt) sample j of prompt p draws from its own
        stream seeded by (seeds[p], j), so a row's response depends on nothing else in the batch
        (evaluation caches, DDP runs equal to single-process ones, sub-batches under a budget
        equal to one batch); otherwise all rows share ``generator`` (then the sub-batch split
        changes the draws). Either way sampling is inverse-CDF with one uniform per token.
        ``progress`` overrides ``self.progress`` for this call.
        """
        model = self.model
        device = next(model.parameters()).device
        num_prompts = len(prompt_ids)
        counts = _per_prompt(num_samples, num_prompts, "num_samples")
        temps = torch.tensor(_per_prompt(temperature, num_prompts, "temperature"), device=device)
        if seeds is not None and len(seeds) != num_prompts:
            raise ValueError(f"seeds has {len(seeds)} entries for {num_prompts} prompts")
        row_to_prompt = torch.repeat_interleave(
            torch.arange(num_prompts, device=device), torch.tensor(counts, device=device)
        )
        p_ids, p_mask = left_pad(prompt_ids, self.pad_id, device)  # (P, Lp)

        segmented = self.share_prompt_kv and supports_segmented_cache(model)
        prefix_len = (
            shared_prefix_len(prompt_ids, system_len) if segmented and self.share_prefix else 0
        )
        batches = plan_batches(
            [len(p) for p in prompt_ids],
            counts,
            self.max_new_tokens,
            self.max_rows_per_batch,
            self.max_kv_tokens,
            prefix_len,
            segmented,
        )
        self.last_plan = batches  # the sub-batches of the last call (diagnostics, tests)
        # sharded FSDP: every rank must run every decoder forward (each all-gathers the layers'
        # shards), so the ranks decode in lockstep (`rank_sync`); None elsewhere
        sync = rank_sync(model, device)
        run_prefix = bool(prefix_len) if sync is None else sync(int(prefix_len > 0)) > 0
        n_parts = len(batches) if sync is None else sync(len(batches))
        prefix = None
        if prefix_len:  # the system prompt + chat header, once for every prompt and sub-batch
            decoder = model.get_decoder()
            prefix = prefix_kv(
                decoder, cache_kwarg(decoder), prompt_ids[0][:prefix_len], num_layers(model), device
            )
        elif run_prefix:  # another rank runs its prefix: the same all-gathers here
            _ghost_forward(model.get_decoder(), device)
        tracker = _Progress(
            progress or self.progress, int(row_to_prompt.numel()), self.progress_every
        )
        parts = [
            self._sample(
                pieces,
                prompt_ids,
                temps,
                system_len,
                generator,
                seeds,
                prefix,
                prefix_len,
                segmented,
                tracker,
                device,
                sync=sync,
            )
            for pieces in batches
        ]
        for _ in range(n_parts - len(batches)):  # another rank has more sub-batches
            _ghost_sample(model.get_decoder(), self.max_new_tokens, sync, device)
        resp, resp_mask, logps, finished, pooled = _concat_rows(parts, self.pad_id, device)
        return RolloutBatch(
            prompt_ids=p_ids,
            prompt_mask=p_mask,
            row_to_prompt=row_to_prompt,
            response_ids=resp,
            response_mask=resp_mask,
            finished=finished,
            temperatures=temps[row_to_prompt],
            logprobs=logps,
            pooled=pooled,
        )

    def _sample(
        self,
        pieces: list[Piece],
        all_prompts: list[list[int]],
        all_temps: torch.Tensor,
        system_len: int,
        generator: torch.Generator | None,
        seeds: list[int] | None,
        prefix: list | None,
        prefix_len: int,
        segmented: bool,
        tracker: _Progress,
        device,
        sync: Callable[[int], int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One sub-batch: prefill its prompts once, then sample every row of its pieces.

        ``sync`` (`rank_sync`, sharded FSDP): after each decode step the ranks agree whether any
        of them still has rows; a rank whose rows are done runs one-token forwards
        (`_ghost_forward`) until every rank's are, so all ranks run the same forwards.
        """
        from transformers import DynamicCache

        model = self.model
        decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
        cache_key = cache_kwarg(decoder)
        prompts = [all_prompts[p] for p, _, _ in pieces]
        counts = [n for _, _, n in pieces]
        row_to_prompt = torch.repeat_interleave(
            torch.arange(len(pieces), device=device), torch.tensor(counts, device=device)
        )  # (N,) local prompt of each row
        n_rows, steps = row_to_prompt.numel(), self.max_new_tokens

        # 1. prefill each distinct prompt once; with a shared prefix only the part after it
        if segmented:
            cache = SegmentedCache(num_layers(model), prefix)
            ids, attn, pos = suffix_batch(prompts, prefix_len, self.pad_id, device)  # (P, T)
            pool = pooling_mask(attn[:, prefix_len:], system_len - prefix_len)  # (P, T)
        else:
            cache = same_dtype_kv(DynamicCache(config=model.config))  # K in V's dtype (kv.py)
            ids, attn = left_pad(prompts, self.pad_id, device)  # (P, Lp)
            pos = positions_from_mask(attn)
            pool = pooling_mask(attn, system_len)
        out = decoder(
            input_ids=ids,
            attention_mask=attn,
            position_ids=pos,
            use_cache=True,
            **{cache_key: cache},
        )
        hidden = out.last_hidden_state.float()  # (P, T, D)
        prompt_sum = torch.where(pool[..., None], hidden, 0.0).sum(1)  # (P, D)
        last_logits = lm_head(out.last_hidden_state[:, -1])  # (P, V)

        # 2. one row per sample; all loop state below lives in "active row" space
        if segmented:
            cache.promote(row_to_prompt, capacity=steps)  # rows read their prompt's single copy
        else:
            cache.batch_select_indices(row_to_prompt)  # per-row copies of the prompt KV
        active = torch.arange(n_rows, device=device)  # local row index of each active row
        attn = attn[row_to_prompt]  # (A, Lp + t)
        logits = last_logits[row_to_prompt].float()  # (A, V)
        next_pos = torch.tensor([len(p) for p in prompts], device=device)[row_to_prompt]  # (A,)
        row_temp = all_temps[torch.tensor([p for p, _, _ in pieces], device=device)][row_to_prompt]
        emb_sum = prompt_sum[row_to_prompt]  # (N, D)
        emb_count = pool.sum(-1)[row_to_prompt].float()  # (N,)
        resp = torch.full((n_rows, steps), self.pad_id, dtype=torch.long, device=device)
        resp_mask = torch.zeros((n_rows, steps), dtype=torch.long, device=device)
        logps = torch.zeros((n_rows, steps), device=device)
        finished = torch.zeros(n_rows, dtype=torch.bool, device=device)
        eos = torch.tensor(self.eos_ids, device=device)
        uniforms = None  # (N, steps) per-row streams, drawn up front on the CPU
        if seeds is not None:
            row_seeds = [row_seed(seeds[p], first + j) for p, first, n in pieces for j in range(n)]
            uniforms = torch.stack(
                [torch.rand(steps, generator=torch.Generator().manual_seed(x)) for x in row_seeds]
            ).to(device, torch.float64)

        live = True  # this rank still has rows in this sub-batch (False only under `sync`)
        for t in range(steps):
            if not live:  # lockstep: this rank's rows are done, another rank's are not
                _ghost_forward(decoder, device)
                if t == steps - 1 or not sync(0):
                    break
                continue
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
            n_ended = int(ended.sum())
            tracker.step(n_ended, len(active))

            keep = ~ended
            if t == steps - 1:
                break
            running = bool(keep.any())
            if not (running if sync is None else sync(int(running)) > 0):
                break  # every row (of every rank, under sync) is done
            if not running:  # another rank still decodes: keep step with it
                live = False
                continue
            # 5. finished rows leave the batch, so long stragglers run alone
            if n_ended:
                idx = keep.nonzero().squeeze(-1)
                cache.batch_select_indices(idx)
                active, attn, h, next_pos = active[idx], attn[idx], h[idx], next_pos[idx]
            logits = lm_head(h).float()
        tracker.finish_batch(n_rows)

        length = int(resp_mask.sum(-1).max().item()) if n_rows else 0
        return dict(
            response_ids=resp[:, :length],
            response_mask=resp_mask[:, :length],
            logprobs=logps[:, :length],
            finished=finished,
            pooled=emb_sum / emb_count.clamp(min=1)[:, None],
        )


def rank_sync(model, device) -> Callable[[int], int] | None:
    """Max of an int over the ranks that shard ``model`` with FSDP, or None when they need not agree.

    Under FSDP (any sharding but ``NO_SHARD``, > 1 rank) each decoder layer's forward all-gathers
    its parameter shards: a collective every rank of the unit's process group must join, in the
    same order. Decoding stops at a per-rank EOS and a per-rank number of sub-batches, so ranks
    would issue different numbers of forwards (wrong shards paired, then a hang). With this
    function `HFRolloutEngine` keeps them in lockstep, as transformers' ``generate(synced_gpus=
    True)`` does for ZeRO-3/FSDP: one 1-element all-reduce per decode step. DDP and one process
    run no collective in a forward: None.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    group = next(
        (
            m.process_group
            for m in model.modules()
            if isinstance(m, FullyShardedDataParallel)
            and m.sharding_strategy != ShardingStrategy.NO_SHARD
            and dist.get_world_size(m.process_group) > 1
        ),
        None,
    )
    if group is None:
        return None

    def max_over_ranks(value: int) -> int:
        t = torch.tensor([int(value)], dtype=torch.long, device=device)  # NCCL: on the GPU
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return int(t.item())

    return max_over_ranks


def _ghost_forward(decoder, device) -> None:
    """One token through every decoder layer, output unused: a rank with nothing left to decode
    joins the layers' all-gathers another rank's real forward issues (`rank_sync`)."""
    decoder(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False)


def _ghost_sample(decoder, steps: int, sync: Callable[[int], int], device) -> None:
    """A sub-batch another rank samples and this one has not: the prefill, then one forward per
    decode step while any rank still decodes (the collectives of `HFRolloutEngine._sample`)."""
    for t in range(steps + 1):  # the prefill + up to `steps` decode steps
        _ghost_forward(decoder, device)
        if t == 0:
            continue
        if t == steps or not sync(0):
            break


ProgressFn = Callable[[int, int, int, float], None]


class _Progress:
    """Counts rows and tokens over a request's sub-batches; calls ``fn`` every ``every`` steps."""

    def __init__(self, fn: ProgressFn | None, total: int, every: int):
        self.fn, self.total, self.every = fn, total, every
        self.done = self.batch_done = self.tokens = self.steps = 0
        self.start = time.perf_counter()

    def step(self, rows_ended: int, tokens: int) -> None:
        self.done += rows_ended
        self.batch_done += rows_ended
        self.tokens += tokens
        self.steps += 1
        if self.steps % self.every == 0:
            self._call()

    def finish_batch(self, rows: int) -> None:
        """Rows still running at ``max_new_tokens`` are done too."""
        self.done += rows - self.batch_done
        self.batch_done = 0
        self._call()

    def _call(self) -> None:
        if self.fn is not None:
            self.fn(self.done, self.total, self.tokens, time.perf_counter() - self.start)


def _concat_rows(parts: list[dict], pad_id: int, device):
    """Sub-batches' rows in order, response dims right-padded to the longest."""
    if not parts:
        empty = torch.zeros((0, 0), dtype=torch.long, device=device)
        none = torch.zeros(0, dtype=torch.bool, device=device)
        return empty, empty, empty.float(), none, torch.zeros((0, 0), device=device)
    length = max(p["response_ids"].size(1) for p in parts)

    def pad(x, value):
        return F.pad(x, (0, length - x.size(1)), value=value)

    resp = torch.cat([pad(p["response_ids"], pad_id) for p in parts])  # (N, R)
    mask = torch.cat([pad(p["response_mask"], 0) for p in parts])  # (N, R)
    logps = torch.cat([pad(p["logprobs"], 0.0) for p in parts])  # (N, R)
    finished = torch.cat([p["finished"] for p in parts])  # (N,)
    pooled = torch.cat([p["pooled"] for p in parts])  # (N, D)
    return resp, mask, logps, finished, pooled


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
