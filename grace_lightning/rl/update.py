"""The policy update: PPO-clip over mini-batches of whole groups, micro-batched (verl actor style).

One rollout batch of B groups x K rollouts is trained in ``num_iterations`` passes; each pass
splits it into MINI-batches of ``prompts_per_minibatch`` whole groups, one optimiser step each
(verl ``ppo_mini_batch_size``, TRL ``steps_per_generation``). A mini-batch is split into
MICRO-batches whose gradients accumulate before the step, so memory grows with the micro-batch:

- ``micro_batch_size``: at most this many rows (verl ``ppo_micro_batch_size_per_gpu``, TRL
  ``per_device_train_batch_size``);
- ``max_tokens_per_micro_batch``: at most this many prompt + response token positions as the
  loss pass runs them, padding included (`padded_tokens`: ``p lp + n r`` on the shared-prompt
  path, ``n (lp + r)`` on full sequences, lp / r the longest prompt / response of the
  micro-batch); verl's ``ppo_max_token_len_per_gpu`` with ``use_dynamic_bsz`` counts real tokens
  because verl removes padding, this forward does not. Rows are packed greedily, whole groups
  first (a group's prompt then runs once per micro-batch on the shared-prompt path).

Split and unsplit steps give the same gradient: every normaliser of the loss (rows and active
tokens of the mini-batch; DAPO's token count over all ranks) is computed for the whole mini-batch
before the micro loop, and each micro-batch's loss is rescaled to its share of the mini-batch loss.

A step whose gradient norm is not finite on any rank is skipped: gradients are zeroed, the
optimiser is not stepped (weights and optimiser state untouched) and the skip is counted.
Collectives go through ``UpdateHooks`` so the same code runs in one process (tests) and under
Lightning's DDP/FSDP strategies (``GraceModule.update_hooks``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from grace_lightning.rl.joint import JointTargets, rows_logprobs_and_embedding
from grace_lightning.rl.losses import clipped_policy_loss, kl_k3
from grace_lightning.rl.policy import _is_checkpointing, response_logprobs
from grace_lightning.rl.precision import autocast_off
from grace_lightning.schema import AlgoConfig, OptimConfig, RolloutConfig, typed

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class UpdateConfig:
    """The update's knobs (``conf/algo/grpo.yaml`` documents each; names as there)."""

    num_generations: int  # K rollouts per group
    prompts_per_minibatch: int  # groups per optimiser step
    max_completion_length: int  # rollout.max_new_tokens (dr_grpo's normaliser)
    num_iterations: int = 1
    micro_batch_size: int | None = None  # rows per micro-batch; None = the whole mini-batch
    max_tokens_per_micro_batch: int | None = None  # prompt + response tokens; None = no budget
    loss_type: str = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    dual_clip: float | None = 3.0
    beta: float = 0.0
    share_prompt: bool = True
    old_logprobs: str = "rollout"  # rollout | recompute
    grad_clip: float | None = 1.0
    pg_weight: float = 1.0  # weight of the policy-gradient (PPO) term; 0 = joint loss alone
    log_term_grad_norms_steps: int = 0  # first optimiser steps that log grad_norm/{pg,joint}

    @classmethod
    def from_cfg(cls, algo: Any, rollout: Any, optim: Any) -> UpdateConfig:
        """From the ``algo``, ``rollout`` and ``optim`` configs (DictConfigs or dicts, e.g.
        ``GraceModule._rank_algo_cfg()``); absent keys take the schema's defaults
        (grace_lightning/schema.py)."""
        a, r, o = typed(AlgoConfig, algo), typed(RolloutConfig, rollout), typed(OptimConfig, optim)
        return cls(
            num_generations=r.num_generations,
            prompts_per_minibatch=a.prompts_per_minibatch,
            max_completion_length=r.max_new_tokens,
            num_iterations=a.num_iterations,
            micro_batch_size=a.micro_batch_size,
            max_tokens_per_micro_batch=a.max_tokens_per_micro_batch,
            loss_type=a.loss_type,
            epsilon_low=a.epsilon_low,
            epsilon_high=a.epsilon_high,
            dual_clip=a.dual_clip,
            beta=a.beta,
            share_prompt=a.share_prompt,
            old_logprobs=a.old_logprobs,
            grad_clip=o.grad_clip,
            pg_weight=a.pg_weight,
            log_term_grad_norms_steps=a.log_term_grad_norms_steps,
        )


def validate_update_config(
    cfg: Any, error: type[Exception] = ValueError, world: int | None = 1
) -> None:
    """Startup checks of the update knobs; raises ``error(message saying what to change)``.
    ``world``: the ranks (devices x nodes; None: unknown, taken as 1) that split the GLOBAL
    ``algo.prompts_per_minibatch``, while ``algo.micro_batch_size`` is per rank (verl's
    ppo_micro_batch_size_per_gpu).

    ``cfg`` is the composed run config (``cfg.algo``, ``cfg.rollout``, ``cfg.prompt``), or one
    built in Python: values are checked as given, absent ``algo`` keys take the schema's defaults
    (grace_lightning/schema.py). ``config.validate`` calls this with its ``ConfigError`` (no
    import cycle: this module never imports ``grace_lightning.config``).
    """
    a, r = cfg.algo, cfg.rollout
    world = max(1, int(world or 1))
    per_rank = max(1, int(a.prompts_per_minibatch) // world)  # as GraceModule._rank_algo_cfg
    rows = per_rank * int(r.num_generations)
    mbs = a.get("micro_batch_size", AlgoConfig.micro_batch_size)
    if mbs is not None:
        if isinstance(mbs, bool) or not isinstance(mbs, int) or mbs < 1:
            raise error(f"algo.micro_batch_size={mbs!r}: use a whole number >= 1, or null (off)")
        if mbs > rows:
            ranks = f" / {world} ranks" if world > 1 else ""
            raise error(
                f"algo.micro_batch_size={mbs} is larger than a rank's mini-batch "
                f"(algo.prompts_per_minibatch={a.prompts_per_minibatch}{ranks} x "
                f"rollout.num_generations={r.num_generations} = {rows} rows): set "
                f"algo.micro_batch_size<={rows}, or null to run the mini-batch in one pass"
            )
    budget = a.get("max_tokens_per_micro_batch", AlgoConfig.max_tokens_per_micro_batch)
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise error(
                f"algo.max_tokens_per_micro_batch={budget!r}: use a whole number of tokens "
                f"(verl ppo_max_token_len_per_gpu, e.g. 16384), or null (off)"
            )
        worst = int(cfg.prompt.max_prompt_tokens) + int(r.max_new_tokens)
        if budget < worst:
            raise error(
                f"algo.max_tokens_per_micro_batch={budget} cannot hold one row: a row can have "
                f"prompt.max_prompt_tokens={cfg.prompt.max_prompt_tokens} + "
                f"rollout.max_new_tokens={r.max_new_tokens} = {worst} tokens. Set "
                f"algo.max_tokens_per_micro_batch>={worst} (verl asserts the same)"
            )
    old = a.get("old_logprobs", AlgoConfig.old_logprobs)
    if old not in ("rollout", "recompute"):
        raise error(f"algo.old_logprobs={old!r}: use rollout or recompute")
    n = a.get("num_iterations", AlgoConfig.num_iterations)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise error(f"algo.num_iterations={n!r}: use a whole number >= 1 (verl ppo_epochs)")
    w = a.get("pg_weight", AlgoConfig.pg_weight)
    if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
        raise error(
            f"algo.pg_weight={w!r}: the policy-gradient term's weight must be a number >= 0 "
            f"(1 = GRACE, 0 = the joint contrastive loss alone)"
        )
    if w == 0 and not float(a.get("contrastive_weight", AlgoConfig.contrastive_weight) or 0) > 0:
        raise error(
            "algo.pg_weight=0 with algo.contrastive_weight=0 leaves no loss to train on: set "
            "algo.contrastive_weight>0 (e.g. 0.5) for the joint loss alone, or algo.pg_weight>0"
        )
    steps = a.get("log_term_grad_norms_steps", AlgoConfig.log_term_grad_norms_steps)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise error(f"algo.log_term_grad_norms_steps={steps!r}: use a whole number >= 0 (0 = off)")


# ----------------------------------------------------------------------------- planning


def padded_tokens(rows: list[int], shapes: Tensor, shared: bool = True) -> int:
    """Token positions the loss pass runs for a micro-batch of ``rows`` (its padded rectangle).

    shapes: (N, 3) ``row_costs`` rows [prompt tokens, response tokens, prompt index], or (N,)
    per-row lengths with nothing shared. `update.rows_logprobs` / `joint.loss_pass_hidden` trim
    the prompts to the longest real prompt ``lp`` and the responses to the longest response
    ``r`` among the rows, then run, with ``p`` distinct prompts and ``n`` rows:

    - shared-prompt pass (``algo.share_prompt``, no gradient checkpointing): ``p x lp`` prompt
      tokens, then ``n x r`` response tokens on the expanded cache -> ``p lp + n r``;
    - full sequences (``share_prompt=false`` or checkpointing): ``n x (lp + r)``.

    (`policy.response_logprobs` feeds ``r - 1`` response tokens: one row's worth less.)
    """
    if not rows:
        return 0
    if shapes.dim() == 1:
        return len(rows) * int(shapes[rows].max())
    sel = shapes[rows]  # (n, 3)
    lp, r = max(1, int(sel[:, 0].max())), max(1, int(sel[:, 1].max()))
    prompts = len(set(sel[:, 2].tolist())) if shared else len(rows)
    return prompts * lp + len(rows) * r


def plan_micro_batches(
    groups: list[Tensor],
    row_tokens: Tensor,
    *,
    max_rows: int | None = None,
    max_tokens: int | None = None,
    shared: bool = True,
) -> list[Tensor]:
    """Pack a mini-batch's rows into micro-batches, greedily and in order.

    groups: the mini-batch's groups, each a (K,) tensor of row indices; row_tokens: (N, 3)
    ``row_costs`` of every row of the rollout batch (or (N,) lengths, nothing shared). The token
    budget counts the padded rectangle the loss pass runs (`padded_tokens`; ``shared``: the
    shared-prompt pass), not the real tokens. A group joins the current micro-batch whole if it
    fits, else opens a new one; a group too big for an empty micro-batch is split row by row.
    Returns a list of 1-D row-index tensors covering every row once, in order.
    """
    if max_tokens is not None:
        rows = torch.cat(groups).tolist()
        worst = max(padded_tokens([i], row_tokens, shared) for i in rows)
        if worst > max_tokens:
            raise RuntimeError(
                f"a rollout row has {worst} prompt + response tokens, more than "
                f"algo.max_tokens_per_micro_batch={max_tokens}: raise it to >= {worst}"
            )
    cap_rows = max_rows if max_rows is not None else math.inf
    cap_tokens = max_tokens if max_tokens is not None else math.inf

    def fits(ids: list[int]) -> bool:
        if len(ids) > cap_rows:
            return False
        return max_tokens is None or padded_tokens(ids, row_tokens, shared) <= cap_tokens

    bins: list[list[int]] = [[]]
    for g in groups:
        ids = g.tolist()
        if fits(bins[-1] + ids):
            bins[-1] += ids
            continue
        if bins[-1] and fits(ids):  # the whole group fits an empty micro-batch
            bins.append(ids)
            continue
        for i in ids:  # split the group
            if bins[-1] and not fits(bins[-1] + [i]):
                bins.append([])
            bins[-1].append(i)
    device = groups[0].device
    return [torch.tensor(b, dtype=torch.long, device=device) for b in bins if b]


def split_to_count(plan: list[Tensor], count: int) -> list[Tensor]:
    """Split the largest micro-batches in two until there are ``count`` of them.

    Ranks must run the same number of forward/backward passes per step (FSDP gathers parameters
    in every forward); a rank whose rows packed into fewer micro-batches splits some.
    """
    plan = list(plan)
    while len(plan) < count:
        i = max(range(len(plan)), key=lambda j: len(plan[j]))
        if len(plan[i]) < 2:
            raise RuntimeError(f"cannot split {sum(len(p) for p in plan)} rows into {count}")
        half = len(plan[i]) // 2
        plan[i : i + 1] = [plan[i][:half], plan[i][half:]]
    return plan


def row_costs(prompt_mask: Tensor, row_to_prompt: Tensor, response_mask: Tensor) -> Tensor:
    """(N, 3) [prompt tokens, response tokens, prompt index] of each row: what the planner's
    `padded_tokens` needs to size a micro-batch's padded rectangle."""
    prompt = prompt_mask.sum(-1)[row_to_prompt]  # (N,)
    return torch.stack([prompt, response_mask.sum(-1), row_to_prompt], dim=-1).long()  # (N, 3)


# ----------------------------------------------------------------------------- hooks


@contextmanager
def _nothing():
    yield


def _clip(params: list[Tensor], max_norm: float | None) -> Tensor:
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else math.inf)


def _is_sharded(model) -> bool:
    """FSDP (a wrapped submodule or DTensor parameters): its unshard/reshard hooks expect one
    backward per forward, so the per-term ``torch.autograd.grad`` passes are skipped there."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover - torch without distributed
        FSDP = ()
    if FSDP and any(isinstance(m, FSDP) for m in model.modules()):
        return True
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


@dataclass
class UpdateHooks:
    """What the update needs from its surroundings. Defaults: one process, plain torch."""

    zero_grad: Callable[[], None]
    step: Callable[[], None]  # the optimiser step
    skip_step: Callable[[], None] = lambda: None  # a skipped step (e.g. advance the step count)
    backward: Callable[[Tensor], None] = lambda loss: loss.backward()
    no_sync: Callable[[], Any] = _nothing  # gradient accumulation without the DDP all-reduce
    clip_grad_norm: Callable[[float | None], Tensor] | None = None  # -> total norm (pre-clip)
    world_size: int = 1
    sum_over_ranks: Callable[[Tensor], Tensor] = lambda t: t
    all_ranks: Callable[[bool], bool] = lambda ok: ok
    gather: Callable[[Tensor], Tensor] = lambda t: t[None]  # (...) -> (world, ...)


# ----------------------------------------------------------------------------- scoring


def rows_logprobs(
    model, ro, rows: Tensor, *, share_prompt: bool, with_entropy: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Log-probs (and entropies) of the given rows of a ``RolloutBatch``, padding trimmed.

    rows: (n,) row indices, any subset (partial groups run their prompt once per call).
    Returns (n, r) log-probs and entropies, r = longest response among the rows.
    """
    prompts, local = torch.unique(ro.row_to_prompt[rows], return_inverse=True)
    pmask = ro.prompt_mask[prompts]  # (p, Lp) left-padded
    lp = max(1, int(pmask.sum(-1).max()))
    r = max(1, int(ro.response_mask[rows].sum(-1).max()))
    return response_logprobs(
        model,
        ro.prompt_ids[prompts][:, -lp:],
        pmask[:, -lp:],
        ro.response_ids[rows][:, :r],
        ro.response_mask[rows][:, :r],
        local,
        ro.temperatures[rows],
        share_prompt=share_prompt,
        with_entropy=with_entropy,
    )


def _eval(model):
    @contextmanager
    def ctx():
        was = model.training
        model.eval()
        try:
            yield
        finally:
            model.train(was)

    return ctx()


@torch.no_grad()
def score_rows(model, ro, plan: list[Tensor], *, share_prompt: bool) -> Tensor:
    """(N, R) float32 log-probs of every planned row: a no-grad, eval-mode (no dropout) pass."""
    out = torch.zeros(ro.response_ids.shape, dtype=torch.float32, device=ro.response_ids.device)
    with _eval(model):
        for rows in plan:
            logp, _ = rows_logprobs(model, ro, rows, share_prompt=share_prompt)
            out[rows, : logp.size(1)] = logp.float()
    return out


# ----------------------------------------------------------------------------- update


@dataclass
class _Normalisers:
    """Loss normalisers of one mini-batch, fixed before its micro loop."""

    rows: int  # rows in this rank's mini-batch
    tokens: Tensor  # () active (weighted) tokens in this rank's mini-batch
    dapo: Tensor  # () DAPO num_items: tokens over all ranks / world size, never 0


@dataclass
class _StepStats:
    sums: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(value)


TOKEN_WEIGHTED = (
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "clip_ratio/dual_clip_mean",
    "entropy",
    "kl",
)
JOINT_ROW_WEIGHTED = ("joint/infonce", "joint/acc")  # summed per row; logged / mini-batch rows


class PolicyUpdater:
    """Runs the update of one rollout batch; see the module docstring."""

    def __init__(
        self, cfg: UpdateConfig, policy, hooks: UpdateHooks, reference=None, first_step: int = 0
    ):
        if cfg.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {cfg.loss_type!r}")
        self.cfg, self.policy, self.hooks = cfg, policy, hooks
        self.reference = reference  # () -> context manager yielding the KL reference model
        self.skipped = 0  # optimiser steps skipped (non-finite gradient norm), this instance
        # the run's optimiser step count before this update (LightningModule.global_step): the
        # per-term gradient norms are logged while it is < cfg.log_term_grad_norms_steps
        self.step_index = first_step
        self.sharded = _is_sharded(policy)  # FSDP: no per-term norms (autograd.grad on shards)

    # -- planning
    def plan(self, groups: list[Tensor], costs: Tensor) -> list[Tensor]:
        c = self.cfg
        plan = plan_micro_batches(
            groups,
            costs,
            max_rows=c.micro_batch_size,
            max_tokens=c.max_tokens_per_micro_batch,
            shared=c.share_prompt and not _is_checkpointing(self.policy),  # the pass that runs
        )
        if self.hooks.world_size > 1:
            n = self.hooks.gather(torch.tensor(len(plan), device=costs.device)).max()
            plan = split_to_count(plan, int(n))
        return plan

    @staticmethod
    def groups_of(ro, prompts: range | list[int]) -> list[Tensor]:
        """(K,) row indices of each prompt in ``prompts`` (rows are found by row_to_prompt)."""
        return [(ro.row_to_prompt == i).nonzero().flatten() for i in prompts]

    # -- the whole rollout batch
    def update(
        self, ro, advantages: Tensor, loss_weight: Tensor, joint: JointTargets | None = None
    ) -> dict[str, float]:
        """ro: RolloutBatch (P prompts, N rows); advantages: (N,) or (N, R); loss_weight: (N,);
        joint: the joint InfoNCE's targets (``rl/joint.py``; None or weight 0 = the paper).

        Returns this rank's metrics averaged over the optimiser steps, plus ``grad_norm``
        (global), ``update_skipped`` (steps skipped here) and, reduced over ranks,
        ``clip_ratio/low_min`` / ``clip_ratio/high_max`` (TRL).
        """
        c = self.cfg
        num_prompts = len(ro.prompt_ids)
        costs = row_costs(ro.prompt_mask, ro.row_to_prompt, ro.response_mask)  # (N, 3)
        all_groups = self.groups_of(ro, range(num_prompts))
        with autocast_off():
            mask_all = ro.response_mask.float() * loss_weight.float()[:, None]  # (N, R)
            advantages = advantages.float()

        old = ro.logprobs
        if c.old_logprobs == "recompute" or old is None:
            old = score_rows(
                self.policy, ro, self.plan(all_groups, costs), share_prompt=c.share_prompt
            )
        ref = None
        if c.beta > 0:
            with self.reference() as ref_model:
                ref = score_rows(
                    ref_model, ro, self.plan(all_groups, costs), share_prompt=c.share_prompt
                )
        old = old.float()

        per_step: list[dict[str, float]] = []
        norms: list[float] = []
        skipped = 0
        for _ in range(c.num_iterations):
            for start in range(0, num_prompts, c.prompts_per_minibatch):
                groups = all_groups[start : start + c.prompts_per_minibatch]
                stats, norm, ok = self.step(
                    ro, groups, costs, mask_all, advantages, old, ref, joint=joint
                )
                per_step.append(stats)
                if ok:
                    norms.append(norm)
                else:
                    skipped += 1
        self.skipped += skipped

        out: dict[str, float] = {}
        for name in dict.fromkeys(n for s in per_step for n in s):  # grad_norm/*: first steps only
            values = [s[name] for s in per_step if name in s]
            out[name] = sum(values) / len(values)
        # TRL: mean over ranks, plus the min of the low and the max of the high clip ratio
        names = sorted(out)
        gathered = self.hooks.gather(torch.tensor([out[n] for n in names], dtype=torch.float64))
        for j, name in enumerate(names):
            out[name] = float(gathered[:, j].mean())
        out["clip_ratio/low_min"] = float(gathered[:, names.index("clip_ratio/low_mean")].min())
        out["clip_ratio/high_max"] = float(gathered[:, names.index("clip_ratio/high_mean")].max())
        out["grad_norm"] = sum(norms) / len(norms) if norms else float("nan")
        out["update_skipped"] = float(skipped)
        return out

    # -- one optimiser step
    def step(self, ro, groups, costs, mask_all, advantages, old, ref, joint=None):
        """Accumulate one mini-batch's gradient over its micro-batches, then step or skip."""
        c, h = self.cfg, self.hooks
        rows = torch.cat(groups)
        with autocast_off():
            tokens = mask_all[rows].sum()
            total = h.sum_over_ranks(tokens.clone()) if h.world_size > 1 else tokens
            # DAPO (TRL): global active tokens / world size, as DDP averages the gradients.
            # Never zero: a mini-batch with no active token anywhere has a zero loss, not NaN
            dapo = total.clamp(min=1.0) / h.world_size
        norm = _Normalisers(rows=len(rows), tokens=tokens, dapo=dapo)
        plan = self.plan(groups, costs)
        # per-term gradients (algo.log_term_grad_norms_steps): one extra backward per term
        # (only with the joint loss on: with one term, grad_norm is that term's norm already)
        want = (
            self.step_index < c.log_term_grad_norms_steps and joint is not None and not self.sharded
        )
        term_grads = {} if want else None
        self.step_index += 1

        h.zero_grad()
        acc = _StepStats()
        for i, micro in enumerate(plan):
            last = i == len(plan) - 1
            with nullcontext() if last else h.no_sync():
                terms = {} if term_grads is not None else None
                loss, m = self.micro_loss(
                    ro, micro, mask_all, advantages, old, ref, norm, joint=joint, terms=terms
                )
                if terms:
                    self._add_term_grads(terms, term_grads)
                h.backward(loss)
            acc.add("loss", loss.detach())
            for name, value in m.items():
                acc.add(name, value)

        grad_norm = (
            h.clip_grad_norm(c.grad_clip)
            if h.clip_grad_norm is not None
            else _clip(list(self.policy.parameters()), c.grad_clip)
        )
        grad_norm = float(grad_norm)
        ok = h.all_ranks(math.isfinite(grad_norm))
        if ok:
            h.step()
        else:
            h.zero_grad()  # nothing of this step reaches the weights or the optimiser state
            h.skip_step()
        h.zero_grad()

        denom = float(tokens)
        stats = {"loss": acc.sums["loss"]}
        for name in TOKEN_WEIGHTED:
            if name in acc.sums:
                stats[name] = acc.sums[name] / denom if denom > 0 else 0.0
        for name in JOINT_ROW_WEIGHTED:  # per-row means over the mini-batch's rows
            if name in acc.sums:
                stats[name] = acc.sums[name] / len(rows)
        if term_grads is not None:
            stats.update(self._term_norms(term_grads))
        return stats, grad_norm, ok

    def _add_term_grads(self, terms: dict[str, Tensor], acc: dict[str, list[Tensor]]) -> None:
        """Add each loss term's gradient w.r.t. the trainable parameters into ``acc`` (summed
        over the micro-batches of the step). ``torch.autograd.grad`` leaves ``.grad`` alone, so
        the step's own backward is unchanged."""
        params = [p for p in self.policy.parameters() if p.requires_grad]
        for name, term in terms.items():
            if not term.requires_grad:  # e.g. pg_weight=0: a zero term, zero gradient
                grads = [torch.zeros_like(p) for p in params]
            else:
                grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
                grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            if name in acc:
                for a, g in zip(acc[name], grads):
                    a.add_(g)
            else:
                acc[name] = [g.detach().float().clone() for g in grads]

    def _term_norms(self, acc: dict[str, list[Tensor]]) -> dict[str, float]:
        """``grad_norm/<term>``: L2 norm of each term's mini-batch gradient, before clipping;
        over ranks the gradients are averaged first (DDP: replicated parameters)."""
        out = {}
        h = self.hooks
        for name, grads in acc.items():
            flat = torch.cat([g.flatten() for g in grads]) if grads else torch.zeros(1)
            if h.world_size > 1:
                flat = h.sum_over_ranks(flat) / h.world_size
            out[f"grad_norm/{name}"] = float(flat.norm())
        return out

    def micro_loss(
        self, ro, rows, mask_all, advantages, old, ref, norm: _Normalisers, joint=None, terms=None
    ):
        """This micro-batch's share of the mini-batch loss, and token-weighted metric sums.

        loss = pg_weight * PPO-clip + beta * KL + alpha * InfoNCE (``algo.pg_weight``; 0 = the
        joint loss alone on the same rollouts and pooling). ``terms``: a dict that receives the
        weighted ``pg`` and ``joint`` terms (tensors in the graph) for their gradient norms.

        With ``joint`` (weight > 0) the same forward also pools each row's embedding and the
        loss gains ``joint.micro_loss`` (alpha * InfoNCE, per-row mean over the mini-batch).
        It is NOT multiplied by ``loss_weight``: a truncated or zero-variance group still
        carries contrastive signal.
        """
        c = self.cfg
        pooled = None
        if joint is not None and joint.weight > 0:
            logp, entropy, pooled = rows_logprobs_and_embedding(
                self.policy,
                ro,
                rows,
                joint.system_len,
                share_prompt=c.share_prompt,
                with_entropy=True,
            )  # (n, r), (n, r), (n, D)
        else:
            logp, entropy = rows_logprobs(
                self.policy, ro, rows, share_prompt=c.share_prompt, with_entropy=True
            )  # (n, r)
        r = logp.size(1)
        with autocast_off():  # the forward above ran under the trainer's autocast; not the loss
            logp = logp.float()
            mask = mask_all[rows, :r]  # (n, r)
            adv = advantages[rows] if advantages.dim() == 1 else advantages[rows, :r]
            n_tok = mask.sum()
            loss, m = clipped_policy_loss(
                logp,
                old[rows, :r],
                adv,
                mask,
                epsilon_low=c.epsilon_low,
                epsilon_high=c.epsilon_high,
                dual_clip=c.dual_clip,
                loss_type=c.loss_type,
                max_completion_length=c.max_completion_length,
                num_items=norm.dapo if c.loss_type == "dapo" else None,
            )
            # the function normalised by this micro-batch; rescale to the mini-batch's normaliser
            if c.loss_type in ("grpo", "dr_grpo"):  # mean over rows / rows * max length
                loss = loss * (len(rows) / norm.rows)
            elif c.loss_type == "bnpo":  # active tokens of this rank's mini-batch
                loss = loss * (n_tok.clamp(min=1.0) / norm.tokens.clamp(min=1.0))
            # () weighted policy-gradient term; pg_weight=0 drops it from the graph altogether
            loss = loss * c.pg_weight if c.pg_weight > 0 else torch.zeros_like(loss).detach()
            if terms is not None:
                terms["pg"] = loss
            sums = {name: float(v) * float(n_tok) for name, v in m.items()}
            if entropy is not None:
                sums["entropy"] = float((entropy.float() * mask).sum())
            if ref is not None:
                kl = kl_k3(logp, ref[rows, :r])  # (n, r)
                kl_sum = (kl * mask).sum()
                loss = loss + c.beta * kl_sum / norm.tokens.clamp(min=1e-8)  # masked mean (mb)
                sums["kl"] = float(kl_sum.detach())
            if pooled is not None:
                joint_loss, joint_sums = joint.micro_loss(pooled, rows, norm.rows)
                loss = loss + joint_loss
                if terms is not None:
                    terms["joint"] = joint_loss
                sums.update(joint_sums)
        return loss, sums
