"""The joint objective (beyond the paper): a differentiable InfoNCE on the loss pass's embeddings.

GRACE trains the representation only through the policy gradient on the text it writes. Every
method that makes an LLM reason before it embeds and beats contrastive training (UME-R1,
Search-R3, O1 Embedder, LREM) also trains the embedding with a differentiable contrastive loss.
The PPO loss pass already runs prompt + rationale with gradient, so its last hidden states,
pooled exactly as the reward pools them, are the rollout's embedding WITH gradient; this module
adds ``alpha * InfoNCE`` on them (``algo.contrastive_weight`` = alpha, 0 = the paper;
``algo.contrastive_tau``). The policy-gradient reward is unchanged.

Pooling (what the rollout engine does, `rollout/engine.py`): the mean of the last-layer hidden
states over (a) the prompt positions after the first ``system_len`` real tokens (user text +
assistant header; `pooling_mask`) and (b) EVERY generated token, EOS and the last token
included, each at its OWN position (the engine feeds each sampled token back and adds the hidden
state that comes out). The PPO loss pass (`rl/policy.py`) does not compute the last token's own
hidden state (it feeds ``response[:, :-1]``: position j predicts token j), so `loss_pass_hidden`
feeds the whole response, one position more per row, and returns both the hidden states that
predict each token (for the log-probs) and each token's own hidden state (for the pooling).

Direction of the loss: each ROLLOUT (with gradient) against every QUERY of the batch plus the
hard negatives (doc -> query), target its own group's query. The InfoNCE baseline
(`contrastive.info_nce`) runs query -> doc with gradient on both sides; here the anchors are
stop-gradient, and doc -> query is the direction that

- decomposes over rows: a row's loss depends on its own embedding and the (fixed) anchors only,
  so micro-batched updates give exactly the unsplit gradient (`rl/update.py`'s contract) and
  under DDP the anchors can be gathered from every rank without any cross-rank autograd
  (query -> doc couples all groups' rollouts through each query's softmax denominator);
- gives the hard negatives a gradient: the rollout is pushed away from them. In query -> doc
  with stop-gradient negatives they would only re-weight the softmax.

With K = 1 it is the baseline's ``info_nce`` with the roles swapped (tested).

Anchors (queries, negatives, unsupervised self-anchors) are stop-gradient: their embeddings come
from the rollout (computed anyway for the reward, no grad). Re-encoding them with gradient would
cost one more forward AND backward over every anchor prompt + its rationale (B * (1 + M) rows, as
many as the policy rows for K = 1 + M) in every micro-batch that uses them, and their gradient
would leave the whole-batch candidate set no longer decomposable over micro-batches. The policy
rows, which do get the gradient, share the model with the anchors, so the representation they
train is the one the anchors use.

Unsupervised: pass the self-anchors (one low-temperature rollout per text) as ``query`` and no
negatives: each rollout is pulled to its own text's anchor and pushed from every other text's,
which directly penalises the text-independent rationale that collapses unsupervised GRACE.

All loss arithmetic runs in fp32 with autocast off (`precision.full_precision`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from grace_lightning.rl.policy import _is_checkpointing, prefill_prompts, token_logprobs
from grace_lightning.rl.precision import f32, full_precision
from grace_lightning.rollout.engine import pooling_mask, positions_from_mask
from grace_lightning.schema import AlgoConfig

__all__ = [
    "JointTargets",
    "LossPassHidden",
    "joint_infonce_loss",
    "loss_pass_hidden",
    "pool_loss_pass",
    "rollout_infonce",
    "rows_logprobs_and_embedding",
    "validate_joint_config",
]


# ----------------------------------------------------------------------------- pooling


def pool_loss_pass(
    prompt_hidden: Tensor,
    prompt_mask: Tensor,
    response_hidden: Tensor,
    response_mask: Tensor,
    system_len: int,
    row_to_prompt: Tensor | None = None,
) -> Tensor:
    """The rollout's mean-pooled embedding from a loss pass, with gradient. -> (N, D) float32.

    prompt_hidden: (P, Lp, D) last-layer hidden states over the left-padded prompts;
    prompt_mask: (P, Lp); response_hidden: (N, R, D) each response token's OWN hidden state
    (`LossPassHidden.response`); response_mask: (N, R) right-padded; system_len: leading real
    prompt tokens left out (`ChatPrompter.system_len`); row_to_prompt: (N,) prompt of each row
    (None: row i has prompt i, P == N). Not normalised (as ``RolloutBatch.pooled``).
    """
    if row_to_prompt is None:
        row_to_prompt = torch.arange(response_hidden.size(0), device=response_hidden.device)
    pool = pooling_mask(prompt_mask, system_len)  # (P, Lp)
    prompt_sum = torch.where(pool[..., None], prompt_hidden.float(), 0.0).sum(1)  # (P, D)
    resp = response_mask.bool()  # (N, R)
    resp_sum = torch.where(resp[..., None], response_hidden.float(), 0.0).sum(1)  # (N, D)
    count = pool.sum(-1)[row_to_prompt] + resp.sum(-1)  # (N,)
    total = prompt_sum[row_to_prompt] + resp_sum  # (N, D)
    return total / count.clamp(min=1)[:, None].float()


# ----------------------------------------------------------------------------- loss pass


@dataclass
class LossPassHidden:
    """Last-layer hidden states of one loss pass (see `loss_pass_hidden`)."""

    prompt: Tensor  # (P', Lp, D) over the prompts (P' = P shared, N full-sequence)
    prompt_mask: Tensor  # (P', Lp) the mask of ``prompt``
    prompt_row: Tensor  # (N,) index into ``prompt`` of each row
    response: Tensor  # (N, R, D) each response token's own hidden state (for pooling)
    predict: Tensor  # (N, R, D) the state that predicts response token j (for log-probs)


def loss_pass_hidden(
    decoder,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    response_ids: Tensor,
    response_mask: Tensor,
    row_to_prompt: Tensor,
    *,
    share_prompt: bool = True,
) -> LossPassHidden:
    """One forward (with gradient when enabled) over prompts + WHOLE responses.

    prompt_ids/mask: (P, Lp) left-padded; response_ids/mask: (N, R) right-padded;
    row_to_prompt: (N,). ``share_prompt``: the prompt runs once per group and its KV cache is
    expanded to the rows (as `rl/policy.py`); False: [prompt | response] per row in one pass
    (the path gradient checkpointing needs). ``predict`` equals what `policy.response_logprobs`
    feeds its LM head, so ``token_logprobs(lm_head, out.predict, ...)`` gives its log-probs.
    """
    if share_prompt:
        prompt_hidden, cache, key = prefill_prompts(decoder, prompt_ids, prompt_mask)  # (P, Lp, D)
        cache.batch_select_indices(row_to_prompt)  # differentiable gather of the prompt's K/V
        mask = prompt_mask[row_to_prompt]  # (N, Lp)
        pos = mask.sum(-1, keepdim=True) + torch.arange(
            response_ids.size(1), device=response_ids.device
        )  # (N, R)
        resp = decoder(
            input_ids=response_ids,
            attention_mask=torch.cat([mask, response_mask], dim=-1),
            position_ids=pos,
            use_cache=True,
            **{key: cache},
        ).last_hidden_state  # (N, R, D)
        first = prompt_hidden[:, -1][row_to_prompt]  # (N, D) predicts response token 0
        predict = torch.cat([first[:, None], resp[:, :-1]], dim=1)  # (N, R, D)
        return LossPassHidden(prompt_hidden, prompt_mask, row_to_prompt, resp, predict)

    ids = torch.cat([prompt_ids[row_to_prompt], response_ids], dim=-1)  # (N, Lp + R)
    mask = torch.cat([prompt_mask[row_to_prompt], response_mask], dim=-1)
    hidden = decoder(
        input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False
    ).last_hidden_state  # (N, Lp + R, D)
    lp, r = prompt_ids.size(1), response_ids.size(1)
    rows = torch.arange(response_ids.size(0), device=response_ids.device)
    return LossPassHidden(
        hidden[:, :lp], mask[:, :lp], rows, hidden[:, lp:], hidden[:, lp - 1 : lp - 1 + r]
    )


def rows_logprobs_and_embedding(
    model,
    ro,
    rows: Tensor,
    system_len: int,
    *,
    share_prompt: bool = True,
    with_entropy: bool = False,
    chunk_tokens: int | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """`update.rows_logprobs` plus each row's pooled embedding, from ONE forward.

    ro: a ``RolloutBatch``; rows: (n,) row indices. Returns (n, r) log-probs, (n, r) entropies
    or None (as `policy.response_logprobs`, r = longest response among the rows) and (n, D)
    float32 pooled embeddings with gradient (unnormalised, as ``RolloutBatch.pooled``).
    Gradient checkpointing cannot run through a KV cache, so it forces the full-sequence path.
    """
    prompts, local = torch.unique(ro.row_to_prompt[rows], return_inverse=True)
    pmask = ro.prompt_mask[prompts]  # (p, Lp) left-padded
    lp = max(1, int(pmask.sum(-1).max()))
    r = max(1, int(ro.response_mask[rows].sum(-1).max()))
    resp_ids, resp_mask = ro.response_ids[rows][:, :r], ro.response_mask[rows][:, :r]
    checkpointing = _is_checkpointing(model) and torch.is_grad_enabled()
    hidden = loss_pass_hidden(
        model.get_decoder(),
        ro.prompt_ids[prompts][:, -lp:],
        pmask[:, -lp:],
        resp_ids,
        resp_mask,
        local,
        share_prompt=share_prompt and not checkpointing,
    )
    logp, entropy = token_logprobs(
        model.get_output_embeddings(),
        hidden.predict,
        resp_ids,
        resp_mask,
        ro.temperatures[rows],
        chunk_tokens=chunk_tokens,
        with_entropy=with_entropy,
    )
    pooled = pool_loss_pass(
        hidden.prompt,
        hidden.prompt_mask,
        hidden.response,
        resp_mask,
        system_len,
        hidden.prompt_row,
    )
    return logp, entropy, pooled


# ----------------------------------------------------------------------------- InfoNCE


@full_precision
def rollout_infonce(
    row_emb: Tensor,
    row_group: Tensor,
    query: Tensor,
    negatives: Tensor | None = None,
    *,
    tau: float,
    in_batch: bool = True,
) -> Tensor:
    """Per-row InfoNCE loss of each rollout against the queries + hard negatives. -> (n,).

    loss_r = -log softmax_c [cos(x_r, c) / tau] at c = q_{g(r)}, over the candidates

        in_batch=True:  every query q_1..q_G and every real negative of every group (the
                        baseline's candidate set: in-batch + hard negatives);
        in_batch=False: the row's own query and its own group's real negatives only.

    row_emb: (n, D) rollout embeddings WITH gradient (any subset of rows, e.g. a micro-batch);
    row_group: (n,) index into ``query`` of each row's group; query: (G, D) stop-gradient
    anchors (the unsupervised self-anchors in the unsupervised variant); negatives: (G, M, D)
    stop-gradient, all-zero vectors are padding (never candidates), or None. Inputs need not
    be normalised. Anchors are detached here whatever is passed.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0 (algo.contrastive_tau), got {tau}")
    x = F.normalize(f32(row_emb), dim=-1)  # (n, D)
    q = F.normalize(f32(query.detach()), dim=-1)  # (G, D)
    G = q.size(0)
    own = row_group[:, None] == torch.arange(G, device=x.device)[None]  # (n, G)
    s_q = x @ q.T / tau  # (n, G)
    if not in_batch:
        s_q = s_q.masked_fill(~own, float("-inf"))
    logits = [s_q]
    if negatives is not None and negatives.numel() > 0:
        neg = f32(negatives.detach())  # (G, M, D)
        M = neg.size(1)
        valid = neg.ne(0).any(-1).flatten()  # (G*M,)
        n = F.normalize(neg.flatten(0, 1), dim=-1)  # (G*M, D)
        s_n = x @ n.T / tau  # (n, G*M)
        keep = valid[None].expand_as(s_n)
        if not in_batch:
            keep = keep & own.repeat_interleave(M, dim=1)  # (n, G*M) own group's only
        logits.append(s_n.masked_fill(~keep, float("-inf")))
    all_logits = torch.cat(logits, dim=-1)  # (n, G [+ G*M])
    positive = s_q.gather(1, row_group[:, None]).squeeze(1)  # (n,)
    return torch.logsumexp(all_logits, dim=-1) - positive


@full_precision
def joint_infonce_loss(
    policy_emb: Tensor,
    query_emb: Tensor,
    negatives: Tensor | None = None,
    *,
    tau: float,
    in_batch: bool = True,
) -> Tensor:
    """Mean `rollout_infonce` over all B*K rollouts. -> scalar.

    policy_emb: (B, K, D) with gradient; query_emb: (B, D) stop-gradient (supervised: the
    queries; unsupervised: the self-anchors); negatives: (B, M, D) zero-padded, or None.
    """
    B, K, _ = policy_emb.shape
    group = torch.arange(B, device=policy_emb.device).repeat_interleave(K)  # (B*K,)
    rows = rollout_infonce(
        policy_emb.reshape(B * K, -1), group, query_emb, negatives, tau=tau, in_batch=in_batch
    )
    return rows.mean()


# ----------------------------------------------------------------------------- update glue


def validate_joint_config(algo, error: type[Exception] = ValueError) -> None:
    """Startup checks of ``algo.contrastive_weight`` / ``contrastive_tau`` /
    ``contrastive_in_batch`` (values as given; absent keys = the schema's defaults, the paper:
    off). Raises ``error(what to change)``."""
    alpha = algo.get("contrastive_weight", AlgoConfig.contrastive_weight)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha < 0:
        raise error(
            f"algo.contrastive_weight={alpha!r}: the joint InfoNCE weight alpha must be a number "
            f">= 0 (0 = the paper: policy gradient only)"
        )
    tau = algo.get("contrastive_tau", AlgoConfig.contrastive_tau)
    if isinstance(tau, bool) or not isinstance(tau, int | float) or tau <= 0:
        raise error(
            f"algo.contrastive_tau={tau!r}: the joint InfoNCE temperature must be > 0 "
            f"(the InfoNCE baseline's, method=infonce: 0.05)"
        )
    in_batch = algo.get("contrastive_in_batch", AlgoConfig.contrastive_in_batch)
    if not isinstance(in_batch, bool):
        raise error(f"algo.contrastive_in_batch={in_batch!r}: use true or false")


@dataclass
class JointTargets:
    """What the update needs for the joint loss of one rollout batch (all stop-gradient).

    query: (G, D) anchors of the GLOBAL batch (gathered over ranks; supervised: the queries,
    unsupervised: the self-anchors); negatives: (G, M, D) zero-padded or None; row_group: (N,)
    index into ``query`` of each LOCAL policy row (``ro.row_to_prompt + rank * B``);
    system_len: ``prompter.system_len`` (the pooling skips it); weight: alpha
    (``algo.contrastive_weight``); tau (``algo.contrastive_tau``); in_batch
    (``algo.contrastive_in_batch``). The update runs `rows_logprobs_and_embedding` instead of
    `update.rows_logprobs` when it has one with ``weight > 0``, and adds `micro_loss`.
    """

    query: Tensor
    negatives: Tensor | None
    row_group: Tensor
    system_len: int
    weight: float
    tau: float
    in_batch: bool = True

    def micro_loss(self, pooled: Tensor, rows: Tensor, num_rows: int) -> tuple[Tensor, dict]:
        """This micro-batch's share of ``weight * mean over the mini-batch's rows`` of the
        per-row InfoNCE. pooled: (n, D) from `rows_logprobs_and_embedding`; rows: (n,) local
        row indices; num_rows: rows of the whole mini-batch on this rank (the normaliser fixed
        before the micro loop, as the policy loss's). Returns (loss, sums) with sums
        ``joint/infonce`` (sum of per-row losses) and ``joint/acc`` (rows whose own query is
        the top candidate): divide both by the mini-batch's rows to log them.
        """
        group = self.row_group[rows]  # (n,)
        per_row = rollout_infonce(
            pooled, group, self.query, self.negatives, tau=self.tau, in_batch=self.in_batch
        )  # (n,)
        loss = self.weight * per_row.sum() / max(1, int(num_rows))
        with torch.no_grad():
            # top-1 over the queries only (a negative beating the query also counts as a miss
            # through the loss, not here): does the rollout land nearest its own query?
            sims = (
                F.normalize(pooled.detach().float(), dim=-1)
                @ F.normalize(self.query.float(), dim=-1).T
            )  # (n, G)
            acc = (sims.argmax(-1) == group).float().sum()
        return loss, {"joint/infonce": float(per_row.detach().sum()), "joint/acc": float(acc)}
