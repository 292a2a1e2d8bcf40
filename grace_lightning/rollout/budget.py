"""Split a rollout request into sampling sub-batches that fit a row and KV-token budget.

A sub-batch is a list of pieces ``(prompt, first_sample, n_samples)``. Prompts are kept whole
(all their samples in one sub-batch) whenever one prompt's samples fit a sub-batch; a prompt
whose samples do not fit even alone is cut into consecutive sample ranges. Sub-batches follow the
request's prompt order and each prompt's sample order, so concatenating their rows gives the
unsplit row order; with per-prompt seeds (sample j of prompt p draws from stream (seed_p, j)) the
sampled tokens do not depend on the split.

KV cost of a sub-batch, in cached token positions per layer (multiply by
2 x layers x kv_heads x head_dim x bytes for memory):

- shared prompt KV (`SegmentedCache`): ``S + P * (L - S) + N * max_new_tokens``, S the shared
  system prefix, P prompts padded to L tokens, N rows;
- per-row copies (``DynamicCache``): ``N * (L + max_new_tokens)``.

Both count the cache at its largest (every row at ``max_new_tokens``); the per-step transient of
one layer's assembled keys (at most N * (L + max_new_tokens) / layers of the above) comes on top.
"""

from __future__ import annotations

Piece = tuple[int, int, int]  # (prompt index, first sample index, number of samples)


def kv_cost(
    pieces: list[Piece], lengths: list[int], max_new_tokens: int, prefix_len: int, shared: bool
) -> int:
    """Cached token positions per layer of one sub-batch at its largest."""
    if not pieces:
        return 0
    length = max(lengths[p] for p, _, _ in pieces)  # left padding to the longest prompt
    rows = sum(n for _, _, n in pieces)
    if not shared:
        return rows * (length + max_new_tokens)
    prompts = len({p for p, _, _ in pieces})
    return prefix_len + prompts * (length - prefix_len) + rows * max_new_tokens


def check_budget(
    max_rows_per_batch: int | None, max_kv_tokens: int | None, longest: int, max_new_tokens: int
) -> None:
    """A budget must hold one row: its prompt and ``max_new_tokens`` response tokens."""
    if max_rows_per_batch is not None and max_rows_per_batch < 1:
        raise ValueError(
            f"rollout.max_rows_per_batch={max_rows_per_batch}: set it to >= 1 rows, or null for "
            "no row limit"
        )
    if max_kv_tokens is not None and max_kv_tokens < 1:
        raise ValueError(
            f"rollout.max_kv_tokens={max_kv_tokens}: set it to >= prompt.max_prompt_tokens + "
            "rollout.max_new_tokens, or null for no KV limit"
        )
    if max_kv_tokens is not None and longest + max_new_tokens > max_kv_tokens:
        raise ValueError(
            f"rollout.max_kv_tokens={max_kv_tokens} cannot hold one row: a {longest}-token "
            f"prompt + rollout.max_new_tokens={max_new_tokens} need {longest + max_new_tokens} "
            f"KV tokens. Raise rollout.max_kv_tokens to >= {longest + max_new_tokens}, lower "
            "rollout.max_new_tokens or prompt.max_prompt_tokens, or set max_kv_tokens=null"
        )


def plan_batches(
    lengths: list[int],
    counts: list[int],
    max_new_tokens: int,
    max_rows_per_batch: int | None = None,
    max_kv_tokens: int | None = None,
    prefix_len: int = 0,
    shared: bool = True,
) -> list[list[Piece]]:
    """Sub-batches (lists of pieces) for prompts of ``lengths`` tokens with ``counts`` samples."""
    if counts and max(counts) > 0:
        longest = max(n for n, c in zip(lengths, counts) if c > 0)
        check_budget(max_rows_per_batch, max_kv_tokens, longest, max_new_tokens)

    def fits(pieces: list[Piece]) -> bool:
        rows = sum(n for _, _, n in pieces)
        if max_rows_per_batch is not None and rows > max_rows_per_batch:
            return False
        cost = kv_cost(pieces, lengths, max_new_tokens, prefix_len, shared)
        return max_kv_tokens is None or cost <= max_kv_tokens

    batches: list[list[Piece]] = []
    current: list[Piece] = []
    for p, count in enumerate(counts):
        if count <= 0:
            continue
        if fits(current + [(p, 0, count)]):
            current.append((p, 0, count))
            continue
        if current:  # start a fresh sub-batch rather than split a prompt that fits one alone
            batches.append(current)
            current = []
        start = 0
        while start < count:
            take = count - start
            while take > 1 and not fits([(p, start, take)]):
                take -= 1
            piece = (p, start, take)
            start += take
            if start < count:
                batches.append([piece])
            else:
                current = [piece]  # the prompt's last piece may share with the next prompts
    if current:
        batches.append(current)
    return batches
