"""A KV cache that stores what rows share once: [system prefix | prompt | row's own tokens].

transformers' ``DynamicCache`` keeps one rectangular ``(rows, heads, length, head_dim)`` tensor per
layer, so K rollouts of one prompt each hold a copy of the prompt's KV (``batch_select_indices``)
and every text of a batch holds a copy of the common system prompt's KV. `SegmentedCache` keeps
each layer in three segments:

- ``prefix``: the system prompt + chat header every prompt starts with, ``(1, H, S, d)``;
- ``prompt``: each distinct prompt's remaining tokens, left-padded, ``(P, H, T, d)``;
- ``rows``:   each row's generated tokens, preallocated to the response budget, ``(A, H, cap, d)``.

Attention still needs one rectangular ``(A, H, S + T + n, d)`` key/value tensor per layer (SDPA,
eager and flash attention all take dense per-row keys), so `update` assembles it for the layer
being run and drops it when the layer is done: one layer's worth of transient memory, the same
copy ``DynamicCache.update``'s ``torch.cat`` makes at every step anyway. What persists is
``S + P*T + A*cap`` token slots per layer instead of ``A * (S + T + cap)``.

Memory arithmetic (per token slot: 2 (K and V) x layers x kv_heads x head_dim x bytes; Qwen2.5-1.5B
in bf16: 2 x 28 x 2 x 128 x 2 B = 28 KiB): the paper recipe's rollout batch (64 prompts x 8 rows +
128 anchor rows = 640 rows, 192 prompts, <= 1024 prompt + 2048 response tokens) holds
640 x 3072 = 1.97M slots = 56 GB with per-row copies, 192 x 1024 + 640 x 2048 = 1.51M slots = 43 GB
here (the response budget dominates once K is large; the saving is (K-1)/K of the prompt part).
A row budget (``HFRolloutEngine(max_rows_per_batch=...)``) or a KV budget (``max_kv_tokens``)
bounds it further by sampling sub-batches one after another.

KV dtype. Keys are cached in the values' dtype. Under bf16 autocast with fp32 master weights,
``k_proj`` and ``v_proj`` return bf16, but transformers' rotary embedding builds cos/sin in the
dtype of the fp32 residual stream, so ``apply_rotary_pos_emb`` hands back fp32 keys: uncast, K
takes 4 B per element next to V's 2 B (1.5x the bf16 KV). Casting at the cache is free and changes
no result: autocast's attention (SDPA, or eager's matmuls) casts K to bf16 before using it anyway,
so the kernels see the same bf16 keys. The other fix, a bf16 copy of the weights for rollouts,
costs 2 B per parameter and a cast of every weight per rollout batch. Without autocast K and V
already share the model's dtype and nothing changes.

Only plain full-attention caches are segmented (`supports_segmented_cache`); sliding-window or
hybrid models fall back to ``DynamicCache`` with per-row copies.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from grace_lightning.rollout.padding import left_pad, positions_from_mask

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values: (B, H, L, d) each


def supports_segmented_cache(model) -> bool:
    """True when every layer is plain full attention (what `SegmentedLayer` reproduces)."""
    types = getattr(model.config, "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        return False
    return not getattr(model.config, "use_sliding_window", False)


class SegmentedLayer(CacheLayerMixin):
    """One decoder layer's KV as [shared prefix | per-prompt part | per-row part]."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, prefix: KV | None = None):
        super().__init__()
        self.prefix = prefix  # (1, H, S, d) x2 or None
        self.prompt: KV | None = None  # (P, H, T, d) x2
        self.row_to_prompt: torch.Tensor | None = None  # (A,) prompt of each row
        self.rows: KV | None = None  # (A, H, cap, d) x2 buffers; first `n` positions used
        self.n = 0
        self.capacity_hint = 0  # preallocate this many row positions at the next allocation
        self.is_initialized = prefix is not None

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def _fixed_len(self) -> int:
        s = 0 if self.prefix is None else self.prefix[0].size(2)
        return s + (0 if self.prompt is None else self.prompt[0].size(2))

    def get_seq_length(self) -> int:
        return self._fixed_len() + self.n

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def update(self, key_states, value_states, *args, **kwargs) -> KV:
        """Append (A, H, q, d) new keys/values; return the assembled (A, H, fixed + n, d) pair.

        Keys are stored in the values' dtype (module docstring, "KV dtype"): under bf16 autocast
        with fp32 weights RoPE returns fp32 keys next to bf16 values.
        """
        key_states = key_states.to(value_states.dtype)
        q = key_states.size(2)
        if self.rows is None or self.n + q > self.rows[0].size(2):
            cap = max(self.n + q, self.capacity_hint)
            new = tuple(
                x.new_empty((*x.shape[:2], cap, x.size(3))) for x in (key_states, value_states)
            )
            if self.n:
                for buf, old in zip(new, self.rows):
                    buf[:, :, : self.n] = old[:, :, : self.n]
            self.rows = new
        for buf, x in zip(self.rows, (key_states, value_states)):
            buf[:, :, self.n : self.n + q] = x
        self.n += q
        return self._assemble(0), self._assemble(1)

    def _assemble(self, i: int) -> torch.Tensor:
        own = self.rows[i][:, :, : self.n]  # (A, H, n, d)
        parts = []
        if self.prefix is not None:
            parts.append(self.prefix[i].expand(own.size(0), -1, -1, -1))
        if self.prompt is not None:
            parts.append(self.prompt[i].index_select(0, self.row_to_prompt))
        return torch.cat([*parts, own], dim=2) if parts else own

    def promote(self, row_to_prompt: torch.Tensor, capacity: int) -> None:
        """After a prefill of P prompts: their tokens become the prompt part, shared by rows."""
        if self.prompt is not None:
            raise RuntimeError("promote() runs once, after the prompt prefill")
        self.prompt = tuple(x[:, :, : self.n].contiguous() for x in self.rows)
        self.row_to_prompt, self.rows, self.n = row_to_prompt, None, 0
        self.capacity_hint = capacity

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows ``indices`` (finished rows leave); the prompt part stays as it is."""
        if self.rows is not None:
            self.rows = tuple(x.index_select(0, indices) for x in self.rows)
        if self.row_to_prompt is not None:
            self.row_to_prompt = self.row_to_prompt.index_select(0, indices)

    def slots(self) -> int:
        """Persistent token slots held (per layer, K and V counted once)."""
        prefix = 0 if self.prefix is None else self.prefix[0].size(2)
        prompt = 0 if self.prompt is None else self.prompt[0].size(0) * self.prompt[0].size(2)
        rows = 0 if self.rows is None else self.rows[0].size(0) * self.rows[0].size(2)
        return prefix + prompt + rows


class SegmentedCache(Cache):
    """A `Cache` of `SegmentedLayer` s (one per decoder layer)."""

    def __init__(self, num_layers: int, prefix: list[KV] | None = None):
        layers = [SegmentedLayer(None if prefix is None else prefix[i]) for i in range(num_layers)]
        super().__init__(layers=layers)

    def promote(self, row_to_prompt: torch.Tensor, capacity: int) -> None:
        for layer in self.layers:
            layer.promote(row_to_prompt, capacity)

    def own_kv(self) -> list[KV]:
        """Each layer's row part, (A, H, n, d) x2: a batch-1 prefill's KV becomes a prefix."""
        return [tuple(x[:, :, : layer.n].contiguous() for x in layer.rows) for layer in self.layers]

    def slots(self) -> int:
        return self.layers[0].slots() if self.layers else 0


def same_dtype_kv(cache: Cache) -> Cache:
    """Make every layer of a transformers cache store keys in its values' dtype; returns it.

    For ``DynamicCache`` (per-row copies, sliding-window/hybrid models, the loss pass's
    shared-prompt cache); `SegmentedLayer` casts by itself. See the module docstring, "KV dtype".
    """
    for layer in cache.layers:
        if isinstance(layer, SegmentedLayer) or getattr(layer, "_same_dtype_kv", False):
            continue
        update = layer.update

        def cast_update(key_states, value_states, *args, _update=update, **kwargs):
            return _update(key_states.to(value_states.dtype), value_states, *args, **kwargs)

        layer.update = cast_update
        layer._same_dtype_kv = True
    return cache


def num_layers(model) -> int:
    return model.config.num_hidden_layers


def shared_prefix_len(prompts: list[list[int]], limit: int) -> int:
    """Longest common prefix of all prompts, at most ``limit`` and leaving every prompt >= 1 token.

    Callers pass ``limit = system_len``: pooling starts there, so no pooled position is shared.
    """
    if not prompts or limit <= 0:
        return 0
    first = prompts[0]
    n = min(limit, min(len(p) for p in prompts) - 1)
    for i in range(max(n, 0)):
        tok = first[i]
        if any(p[i] != tok for p in prompts):
            return i
    return max(n, 0)


@torch.no_grad()
def prefix_kv(decoder, cache_key: str, ids: list[int], n_layers: int, device) -> list[KV]:
    """KV of one token sequence (batch 1, positions 0..S-1), one (keys, values) pair per layer."""
    cache = SegmentedCache(n_layers)
    decoder(
        input_ids=torch.tensor([ids], device=device),
        attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=device),
        position_ids=torch.arange(len(ids), device=device)[None],
        use_cache=True,
        **{cache_key: cache},
    )
    return cache.own_kv()


def suffix_batch(
    prompts: list[list[int]], start: int, pad_id: int, device=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens after a shared ``start``-token prefix, left-padded, as the continuation of it.

    Returns ids (B, T), the attention mask over [prefix | suffix] (B, start + T) and position ids
    (B, T) that continue from ``start`` and skip the padding, so every real token sees the same
    keys at the same positions as in the unshared, left-padded layout.
    """
    ids, mask = left_pad([p[start:] for p in prompts], pad_id, device)  # (B, T)
    full = torch.cat([mask.new_ones((len(prompts), start)), mask], dim=-1)  # (B, S + T)
    return ids, full, positions_from_mask(mask) + start
