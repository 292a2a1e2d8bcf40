"""GraceModule: the GRACE policy-gradient step as a LightningModule.

One ``training_step`` is one rollout batch (``data.prompts_per_step`` policy prompts over all
ranks, ``prompts_per_step / world_size`` on each; ``algo.prompts_per_minibatch`` is global too):

    rollout -> embed -> reward -> advantage -> update (several optimiser steps, PPO-clip)

Supervised (paper §3, upstream ``train_mode=supervised``): the positive document is the policy
prompt and gets K rollouts at ``rollout.temperature``; the query and its negatives are anchors,
one rollout each at ``rollout.anchor_temperature``, no gradient. Unsupervised: the sentence is the
policy prompt, and one more rollout of the same sentence at the anchor temperature is its
self-anchor. Embeddings come from the rollout loop itself (see ``rollout/engine.py``).

The update (mini-batches, micro-batches, loss normalisers, skipped steps) lives in
``rl/update.py``; this module gives it Lightning's backward, DDP/FSDP collectives and clipping
(``update_hooks``). Rewards and advantages run with autocast off (fp32 under bf16-mixed), and
logged metrics use TRL's names over the gathered batch of every rank.

The advantage estimator (``algo.advantage``) and the reward terms (``reward.terms``) are Hydra
``_target_``s resolved by ``rl/targets.py``: this module builds the inputs they name and calls
them (docs/extending.md); it knows none of them by name.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

from grace_lightning.export.policy import save_policy
from grace_lightning.models.backbone import BackboneConfig, load_backbone
from grace_lightning.models.lora import wrap_lora
from grace_lightning.prompts import ChatPrompter
from grace_lightning.rl import advantages as adv_fns
from grace_lightning.rl import rewards as reward_fns
from grace_lightning.rl.diagnostics import collapse_metrics
from grace_lightning.rl.joint import JointTargets
from grace_lightning.rl.precision import autocast_off
from grace_lightning.rl.targets import needed_inputs, resolve_advantage, score_terms
from grace_lightning.rl.targets import resolve_terms as resolve_reward_terms
from grace_lightning.rl.update import PolicyUpdater, UpdateConfig, UpdateHooks
from grace_lightning.rollout.engine import HFRolloutEngine, RolloutBatch, text_seed
from grace_lightning.schema import (
    AlgoConfig,
    OptimConfig,
    PromptConfig,
    RewardConfig,
    RolloutConfig,
    typed,
)

log = logging.getLogger(__name__)


class GraceModule(L.LightningModule):
    def __init__(
        self,
        backbone: dict,
        prompt: dict,
        rollout: dict,
        reward: dict,
        algo: dict,
        optim: dict,
        logging_cfg: dict | None = None,
        peft: dict | None = None,
        gradient_checkpointing: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False  # several PPO mini-batch steps per rollout batch
        self.backbone_cfg = BackboneConfig(**dict(backbone))
        self.prompt_cfg = prompt = typed(PromptConfig, prompt)
        self.rollout_cfg = rollout = typed(RolloutConfig, rollout)  # defaults: the schema's
        self.optim_cfg = typed(OptimConfig, optim)
        self.reward_cfg = typed(RewardConfig, reward)
        self.algo_cfg = algo = typed(AlgoConfig, algo)
        self.logging_cfg = dict(logging_cfg or {})
        # the pluggable parts (rl/targets.py), resolved before any weights load
        self.estimator = resolve_advantage(self.algo_cfg.advantage)
        self.reward_terms = resolve_reward_terms(self.reward_cfg)
        self.term_inputs = needed_inputs(self.reward_terms)  # what compute_rewards must build
        self._greedy_completions: list[str] | None = None  # ReMax rationales, if a term reads text
        self.policy, self.tokenizer = load_backbone(self.backbone_cfg)
        if self.optim_cfg.master_weights_fp32 and self.policy.dtype != torch.float32:
            # bf16 weights would swallow lr=1e-6 updates; compute runs in bf16 under autocast
            self.policy.float()
        if gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
            self.policy.config.use_cache = False
        self.peft_cfg = dict(peft or {})
        if self.peft_cfg:
            self.policy = wrap_lora(self.policy, self.peft_cfg)
        self.prompter = ChatPrompter(self.tokenizer, prompt.system_prompt, prompt.max_prompt_tokens)
        self.engine = HFRolloutEngine(
            self.policy,
            self.tokenizer,
            max_new_tokens=rollout.max_new_tokens,
            top_p=rollout.top_p,
            top_k=rollout.top_k,
            ignore_eos=rollout.ignore_eos,
            max_rows_per_batch=rollout.max_rows_per_batch,
            max_kv_tokens=rollout.max_kv_tokens,
            share_prompt_kv=rollout.share_prompt_kv,
            share_prefix=rollout.share_prefix,
            max_prompt_tokens=prompt.max_prompt_tokens,
            progress_every=rollout.progress_every,
        )
        if rollout.engine == "vllm":  # colocated vLLM (rollout/vllm_engine.py)
            from grace_lightning.rollout.vllm_engine import VLLMRolloutEngine, vllm_model_path

            self.engine = VLLMRolloutEngine(
                self.policy,
                self.tokenizer,
                vllm_model_path(self.backbone_cfg, self.policy, self.tokenizer),
                max_new_tokens=rollout.max_new_tokens,
                top_p=rollout.top_p,
                top_k=rollout.top_k,
                ignore_eos=rollout.ignore_eos,
                max_prompt_tokens=prompt.max_prompt_tokens,
                vllm=rollout.vllm,
            )
        self._synced_step: int | None = None  # global_step whose weights the engine holds
        self.last_weight_sync_s = 0.0
        self.ref_policy = None
        if algo.beta > 0 and not self.peft_cfg:
            self.ref_policy = (
                self._frozen_copy()
            )  # with LoRA the reference is the base, adapters off
        self.seed = seed
        self.skipped_steps = 0  # optimiser steps skipped (non-finite reward or gradient norm)
        self.num_tokens = 0  # prompt + completion tokens of the policy rows so far, all ranks
        table = self.logging_cfg.get("table_path")
        self.table_path = Path(table) if table else None  # rationale table (JSONL) in the run dir

    # ------------------------------------------------------------------ setup
    def _frozen_copy(self):
        ref, _ = load_backbone(self.backbone_cfg)
        ref.load_state_dict(self.policy.state_dict())
        ref.requires_grad_(False).eval()
        return ref

    def on_train_epoch_start(self) -> None:
        # from_pretrained returns eval mode and Lightning leaves it: LoRA dropout needs train mode
        self.policy.train()

    def configure_optimizers(self):
        o = self.optim_cfg
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return torch.optim.AdamW(
            params,
            lr=o.lr,
            weight_decay=o.weight_decay,
            betas=tuple(o.betas),
            eps=o.eps,
        )

    def _step_seed(self) -> int:
        # sampling streams are keyed by (seed, step, role, text): reproducible, resumable, and
        # independent of which rank a group lands on (DDP == one process on the same batch)
        return self.seed * 1_000_003 + self.global_step

    @contextmanager
    def _reference(self):
        """The KL reference: a frozen copy, or with LoRA the same model with adapters disabled."""
        if self.ref_policy is not None:
            yield self.ref_policy
        else:
            with self.policy.disable_adapter():
                yield self.policy

    @contextmanager
    def _eval_mode(self):
        was = self.policy.training
        self.policy.eval()
        try:
            yield
        finally:
            self.policy.train(was)

    # ------------------------------------------------------------------ step
    def training_step(self, batch: dict[str, Any], batch_idx: int):
        """rollout -> reward -> advantage -> update (``rl/update.py``)."""
        k = self.rollout_cfg["num_generations"]
        timings: dict[str, float] = {}

        t0 = time.perf_counter()
        rollouts, anchors = self.rollout(batch)  # (B*K rows), anchor embeddings
        timings["time/rollout"] = time.perf_counter() - t0  # incl. weight sync + scoring (vLLM)
        if hasattr(self.engine, "sync_weights"):
            timings["time/weight_sync"] = self.last_weight_sync_s
            timings["time/rollout_scoring"] = self.engine.last_score_s

        t0 = time.perf_counter()
        b = len(rollouts.prompt_ids)
        with autocast_off():  # reward, advantage and loss arithmetic never in bf16
            policy_emb = rollouts.embeddings.view(b, k, -1).float()  # (B, K, D)
            truncated = rollouts.truncated.view(b, k)  # (B, K)
            text = self.text_inputs(batch, rollouts)  # {} unless a reward term reads text
            terms = self.compute_rewards(policy_emb, anchors, **text)  # each (B, K), as GRPO's
            lengths = rollouts.lengths.view(b, k)  # (B, K) response tokens (soft length rule)
            rewards, loss_weight = self._truncate(terms["total"], truncated, lengths)  # (B, K)
            baseline = (  # (B,) e.g. ReMax: the estimator declares needs_greedy_baseline
                self.greedy_baseline(policy_emb, anchors, **text)
                if self.estimator.needs_greedy_baseline
                else None
            )
            # over the GLOBAL batch, then this rank's groups: batch-normalising estimators
            # (scale_rewards=batch, REINFORCE++) see what a single process would see
            glob_rewards = self._gather(rewards)
            glob_base = None if baseline is None else self._gather(baseline)
            # tokens each rollout puts into the loss (REINFORCE++ whitens over tokens, as verl)
            tokens = self._gather(rollouts.lengths.float().view(b, k) * loss_weight)  # (B_g, K)
            advantages = self._local(self.compute_advantages(glob_rewards, glob_base, tokens), b)
            if self.algo_cfg.dynamic_sampling:
                # DAPO: groups whose rewards have zero variance carry no signal; drop them from
                # the loss (DAPO also over-samples to refill the batch; we do not refill)
                loss_weight = loss_weight * (~adv_fns.zero_std_groups(rewards))[:, None]
        timings["time/reward"] = time.perf_counter() - t0

        metrics = self.rollout_metrics(rollouts, terms, rewards, truncated)
        # raw reward terms must be finite (truncation="mask" adds NaNs on purpose afterwards)
        finite = all(bool(torch.isfinite(t).all()) for t in terms.values())
        finite &= bool(torch.isfinite(advantages).all())
        if baseline is not None:
            finite &= bool(torch.isfinite(baseline).all())
        # every rank must take the same branch (the update has collectives): skip on all if any
        finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            # a NaN/inf reward never reaches the optimiser: log it and skip this update (the
            # optimiser steps still count, so max_steps, seeds and checkpoints keep their cadence)
            log.warning("non-finite reward at step %d: update skipped", self.global_step)
            skipped = self._skip_rollout_batch(b)
            metrics["update_skipped"] = float(skipped)
            metrics["skipped_steps"] = float(self.skipped_steps)
            self.log_dict(metrics, on_step=True, batch_size=b)
            return None

        t0 = time.perf_counter()
        joint = self.joint_targets(rollouts, anchors, b)
        # only with the joint loss on: subclasses that override update(ro, adv, weight) (e.g.
        # tests/probes.py) keep working with the paper's objective
        kw = {"joint": joint} if joint is not None else {}
        sampler, tis = self.sampler_terms(rollouts)  # rollout.engine=vllm: mismatch, TIS
        metrics.update(sampler)
        adv = advantages.reshape(-1)  # (N,)
        if tis is not None:  # per-token weight >= 0 folded into the advantage: (N, R)
            with autocast_off():
                adv = adv.float()[:, None] * tis
        metrics.update(self.update(rollouts, adv, loss_weight.reshape(-1), **kw))
        timings["time/update"] = time.perf_counter() - t0
        metrics.update(timings)
        metrics["skipped_steps"] = float(self.skipped_steps)
        self.log("reward", metrics.pop("reward"), prog_bar=True, batch_size=b)
        self.log_dict(metrics, on_step=True, batch_size=b)
        self.maybe_log_table(batch, rollouts, terms, rewards, advantages)
        return None

    def _truncate(self, total: torch.Tensor, truncated: torch.Tensor, lengths: torch.Tensor):
        """reward.truncation's rule (``rewards.apply_truncation``). total, truncated,
        lengths: (B, K). -> rewards (B, K), loss weights (B, K)."""
        c = self.reward_cfg
        return reward_fns.apply_truncation(
            total,
            truncated,
            mode=c.truncation,
            value=c.truncation_value,
            lengths=lengths,
            max_len=int(self.rollout_cfg["max_new_tokens"]),
            buffer=c.overlong_buffer,
            penalty_factor=float(c.overlong_penalty_factor),
        )

    def validation_step(self, batch: dict[str, Any], batch_idx: int):
        """Held-out reward (no update): ``val/reward`` and ``val/rewards/<term>/mean``."""
        k = self.rollout_cfg["num_generations"]
        rollouts, anchors = self.rollout(batch)
        b = len(rollouts.prompt_ids)
        with autocast_off():
            emb = rollouts.embeddings.view(b, k, -1).float()
            terms = self.compute_rewards(emb, anchors, **self.text_inputs(batch, rollouts))
            rewards, _ = self._truncate(
                terms["total"], rollouts.truncated.view(b, k), rollouts.lengths.view(b, k)
            )
        metrics = {"val/reward": torch.nanmean(rewards)}
        metrics.update({f"val/rewards/{n}/mean": t.mean() for n, t in terms.items()})
        metrics["val/completions/mean_length"] = rollouts.lengths.float().mean()
        self.log_dict(metrics, on_epoch=True, batch_size=b, sync_dist=True)

    # ------------------------------------------------------------------ 1. rollout
    def policy_texts(self, batch) -> list[str]:
        return batch["positive"] if self.reward_cfg.mode == "sup" else batch["text"]

    @torch.no_grad()
    def rollout(self, batch) -> tuple[RolloutBatch, dict[str, torch.Tensor]]:
        """K rollouts per policy prompt and one per anchor, in ONE batched generate call."""
        r, k = self.rollout_cfg, self.rollout_cfg["num_generations"]
        texts = self.policy_texts(batch)
        b = len(texts)
        anchor_texts = (
            batch["query"] + [n for negs in batch["negatives"] for n in negs]
            if self.reward_cfg.mode == "sup"
            else list(texts)
        )
        # ReMax: one greedy rollout per prompt (the estimator declares needs_greedy_baseline)
        greedy = list(texts) if self.estimator.needs_greedy_baseline else []
        prompts = self.prompter.encode(list(texts) + anchor_texts + greedy)
        counts = [k] * b + [1] * (len(anchor_texts) + len(greedy))
        temps = [r["temperature"]] * b + [r["anchor_temperature"]] * len(anchor_texts)
        temps += [0.0] * len(greedy)
        roles = ["policy"] * b + ["anchor"] * len(anchor_texts) + ["greedy"] * len(greedy)
        seeds = [
            text_seed(self._step_seed(), f"{role}\0{text}")
            for role, text in zip(roles, list(texts) + anchor_texts + greedy)
        ]
        if (seconds := self._sync_engine()) is not None:  # outside fit (no batch-start hook)
            self.last_weight_sync_s = seconds
        with self._eval_mode():
            out = self.engine.generate(
                prompts, counts, temps, self.prompter.system_len, seeds=seeds
            )
        rows = b * k
        policy = _select_rows(out, torch.arange(rows, device=out.row_to_prompt.device), b)
        anchor_emb = out.embeddings[rows : rows + len(anchor_texts)]  # (A, D), anchor_texts order
        # the policy rows' lengths and truncation flags, (B, K): reward terms may read them
        anchors: dict[str, torch.Tensor] = {
            "lengths": policy.lengths.view(b, k),
            "truncated": policy.truncated.view(b, k),
        }
        if greedy:
            start = rows + len(anchor_texts)
            anchors["greedy"] = out.embeddings[start:]  # (B, D)
            anchors["greedy_truncated"] = out.truncated[start:]  # (B,)
            anchors["greedy_lengths"] = out.lengths[start:]  # (B,)
            if "completions" in self.term_inputs:  # decoded only when a reward term reads text
                g = torch.arange(start, len(out.row_to_prompt), device=out.row_to_prompt.device)
                self._greedy_completions = _select_rows(out, g, 0).response_texts(self.tokenizer)
        if self.reward_cfg.mode == "sup":
            anchors["query"] = anchor_emb[:b]
            anchors["negatives"] = _pad_negatives(
                anchor_emb[b:], [len(n) for n in batch["negatives"]]
            )
        else:
            anchors["anchor"] = anchor_emb
        return policy, anchors

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The engine's copy of the weights (vLLM), made here and not in the training step: under
        # FSDP, Lightning runs training_step inside the root's forward, where gathering the full
        # parameters (summon_full_params) is refused.
        self.last_weight_sync_s = self._sync_engine() or 0.0

    def _sync_engine(self) -> float | None:
        """An engine with its own copy of the weights (vLLM) gets the policy's current ones
        when an optimiser step changed them since its last copy; -> seconds (None: no sync)."""
        if not hasattr(self.engine, "sync_weights") or self._synced_step == self.global_step:
            return None
        fsdp = getattr(self.trainer.strategy, "model", None) if self._trainer else None
        seconds = self.engine.sync_weights(fsdp_root=fsdp)
        self._synced_step = int(self.global_step)
        return seconds

    def sampler_terms(self, ro: RolloutBatch) -> tuple[dict[str, float], torch.Tensor | None]:
        """vLLM vs trainer log-prob mismatch metrics and, with ``rollout.vllm.tis_cap``, the
        truncated importance-sampling weights (N, R) for the policy rows (None: off)."""
        if ro.sampler_logprobs is None:
            return {}, None
        from grace_lightning.rollout.vllm_engine import sampler_metrics, tis_weights

        cap = self.rollout_cfg.vllm.tis_cap
        m = sampler_metrics(ro.logprobs, ro.sampler_logprobs, ro.response_mask, cap)
        w = tis_weights(ro.logprobs, ro.sampler_logprobs, ro.response_mask, cap) if cap else None
        return m, w

    # ------------------------------------------------------------------ 2. reward
    def compute_rewards(
        self,
        policy_emb: torch.Tensor,
        anchors: dict,
        texts: list[str] | None = None,
        completions: list[list[str]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``reward.terms`` over the GLOBAL batch (hard negatives come from every rank's groups):
        {name: (B, K)} for this rank's groups, plus ``total`` = sum_n w_n term_n / tau.

        Builds only the inputs some term names (rl/targets.py ``TERM_INPUTS``): embeddings and
        ``anchors``' lengths / truncation flags (B, K); ``texts`` (B) and ``completions`` (B x K)
        come from ``text_inputs`` when a term reads text.
        """
        c, need = self.reward_cfg, self.term_inputs
        b, k = policy_emb.shape[:2]
        sup = c.mode == "sup"
        inputs: dict[str, Any] = {
            "rollouts": self._gather(policy_emb),  # (B_global, K, D)
            "tau": float(c.tau),
            "mode": c.mode,
            "max_new_tokens": int(self.rollout_cfg["max_new_tokens"]),
            "step": int(self.global_step),
        }
        if "anchor" in need:
            inputs["anchor"] = self._gather(anchors["query" if sup else "anchor"])  # (B_g, D)
        if "negatives" in need:
            inputs["negatives"] = self._gather(anchors["negatives"]) if sup else None
        if "lengths" in need:
            inputs["lengths"] = self._gather(anchors["lengths"].float())  # (B_global, K)
        if "truncated" in need:
            inputs["truncated"] = self._gather(anchors["truncated"].float()).bool()
        for name, value in (("texts", texts), ("completions", completions)):
            if name in need:
                if value is None:
                    raise ValueError(f"a reward term reads {name!r}: pass it (text_inputs)")
                inputs[name] = self._gather_objects(value)
        terms = score_terms(self.reward_terms, inputs, float(c.tau))
        return {name: self._local(t, b) for name, t in terms.items()}

    def text_inputs(self, batch, ro: RolloutBatch) -> dict[str, list]:
        """``texts`` (B policy texts) and ``completions`` (B lists of K rationales) for the
        reward terms that name them; {} when none does (no decoding)."""
        out: dict[str, list] = {}
        if "texts" in self.term_inputs:
            out["texts"] = list(self.policy_texts(batch))
        if "completions" in self.term_inputs:
            k = self.rollout_cfg["num_generations"]
            flat = ro.response_texts(self.tokenizer)
            out["completions"] = [flat[i : i + k] for i in range(0, len(flat), k)]
        return out

    def _gather_objects(self, items: list) -> list:
        """Every rank's ``items`` (a list), concatenated in rank order (``_gather`` for text)."""
        if self.trainer.world_size == 1:
            return list(items)
        gathered: list = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(gathered, list(items))
        return [x for part in gathered for x in part]

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """All ranks' ``x`` concatenated along dim 0 in rank order (the global batch).

        Dims after the first are zero-padded to the largest over ranks first (e.g. a different
        number of negatives per rank; zero vectors are "no negative", as in ``_pad_negatives``).
        """
        if self.trainer.world_size == 1:
            return x
        if x.dim() > 1:
            shape = torch.tensor(x.shape[1:], device=x.device)
            biggest = self.all_gather(shape).reshape(-1, x.dim() - 1).amax(0).tolist()
            pad = []  # F.pad order: last dim first, (before, after) each
            for have, want in zip(reversed(x.shape[1:]), reversed(biggest)):
                pad += [0, want - have]
            if any(pad):
                x = torch.nn.functional.pad(x, pad)
        return self.all_gather(x).flatten(0, 1)

    def _local(self, x: torch.Tensor, b: int) -> torch.Tensor:
        """This rank's ``b`` rows of a ``_gather``-ed tensor (ranks hold equal-size blocks)."""
        start = self.global_rank * b if self.trainer.world_size > 1 else 0
        return x[start : start + b]

    # ------------------------------------------------------------------ 3. advantage
    def compute_advantages(
        self,
        rewards: torch.Tensor,
        baseline: torch.Tensor | None = None,
        token_counts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``algo.advantage`` (rl/targets.py; the paper: group mean-centred, no std division).

        rewards, token_counts: (B, K) over the global batch (token_counts: response tokens that
        enter the loss, for REINFORCE++'s token whitening); baseline: (B,) the greedy rollout's
        reward for an estimator that declares ``needs_greedy_baseline`` (ReMax), else None.
        Returns (B, K) float32, shape- and finiteness-checked.
        """
        return self.estimator(
            rewards,
            token_counts=token_counts,
            baseline=baseline,
            scale=self.algo_cfg.scale_rewards,
            step=int(self.global_step),
        )

    def greedy_baseline(
        self,
        policy_emb: torch.Tensor,
        anchors: dict,
        texts: list[str] | None = None,
        completions: list[list[str]] | None = None,
    ) -> torch.Tensor:
        """(B,) ReMax baseline: the greedy rollout's reward, scored by the same reward terms.

        The greedy rollout joins its group only here (as member K+1: its consistency is over the
        K sampled rollouts); the K sampled rollouts' own rewards come from ``compute_rewards``
        over the K of them alone, exactly as GRPO's and validation's.
        """
        k = policy_emb.size(1)
        with_greedy = torch.cat([policy_emb, anchors["greedy"].float()[:, None]], dim=1)
        plus_one = dict(anchors)  # the greedy rollout's length and flag as member K+1
        for name in ("lengths", "truncated"):
            plus_one[name] = torch.cat([anchors[name], anchors[f"greedy_{name}"][:, None]], dim=1)
        text = {"texts": texts} if texts is not None else {}
        if completions is not None:
            greedy = self._greedy_completions or []
            text["completions"] = [c + [g] for c, g in zip(completions, greedy)]
        total = self.compute_rewards(with_greedy, plus_one, **text)["total"][:, k]  # (B,)
        base, _ = self._truncate(
            total[:, None], anchors["greedy_truncated"][:, None], anchors["greedy_lengths"][:, None]
        )
        return base[:, 0]

    # ------------------------------------------------------------------ 4. update
    def joint_targets(self, ro: RolloutBatch, anchors: dict, b: int) -> JointTargets | None:
        """The joint InfoNCE's stop-gradient targets (``rl/joint.py``), or None when
        ``algo.contrastive_weight`` is 0 (the paper). Anchors over the GLOBAL batch: every
        rank's queries (+ hard negatives) are candidates; this rank's rows point at its own
        block (``row_to_prompt + rank * B``). Unsupervised: the self-anchors, no negatives.
        """
        a = self.algo_cfg
        alpha = float(a.contrastive_weight)
        if alpha <= 0:
            return None
        with autocast_off():
            if self.reward_cfg.mode == "sup":
                query = self._gather(anchors["query"]).float()  # (B_global, D)
                negs = self._gather(anchors["negatives"]).float()  # (B_global, M, D)
            else:
                query, negs = self._gather(anchors["anchor"]).float(), None
        offset = self.global_rank * b if self.trainer.world_size > 1 else 0
        return JointTargets(
            query,
            negs,
            ro.row_to_prompt + offset,  # (N,) index into query
            self.prompter.system_len,
            weight=alpha,
            tau=float(a.contrastive_tau),
            in_batch=bool(a.contrastive_in_batch),
        )

    def update(
        self,
        ro: RolloutBatch,
        advantages: torch.Tensor,
        loss_weight: torch.Tensor,
        joint: JointTargets | None = None,
    ) -> dict:
        """PPO-clip over mini-batches of whole groups, micro-batched: ``rl/update.py``
        (plus ``joint``'s alpha * InfoNCE when set)."""
        cfg = UpdateConfig.from_cfg(self._rank_algo_cfg(), self.rollout_cfg, self.optim_cfg)
        updater = PolicyUpdater(
            cfg,
            self.policy,
            self.update_hooks(),
            reference=self._reference,
            first_step=int(self.global_step),  # grad_norm/{pg,joint} on the run's first steps
        )
        out = updater.update(ro, advantages, loss_weight, joint=joint)
        self.skipped_steps += updater.skipped
        # grad_norm/{pg,joint} exist on the first steps only: straight to the loggers, since
        # self.log would repeat their last value on every later step
        terms = {k: out.pop(k) for k in [k for k in out if k.startswith("grad_norm/")]}
        if terms:
            for logger in self.loggers:
                logger.log_metrics(terms, step=self.global_step)
        out["lr"] = self.optimizers().param_groups[0]["lr"]
        return out

    def update_hooks(self) -> UpdateHooks:
        """The update's view of Lightning: manual backward, DDP no_sync, strategy collectives."""
        opt, strategy = self.optimizers(), self.trainer.strategy
        return UpdateHooks(
            zero_grad=lambda: opt.zero_grad(set_to_none=True),
            step=opt.step,
            skip_step=lambda: _skipped_step(opt),
            backward=self.manual_backward,
            no_sync=strategy.block_backward_sync
            if hasattr(strategy, "block_backward_sync")
            else nullcontext,
            clip_grad_norm=self._clip_grad_norm,
            world_size=self.trainer.world_size,
            sum_over_ranks=lambda t: strategy.reduce(t, reduce_op="sum"),
            all_ranks=lambda ok: bool(strategy.reduce_boolean_decision(bool(ok), all=True)),
            gather=self._gather_ranks,
        )

    def _clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        """Total gradient norm before clipping; clips to ``max_norm`` (None/0: no clipping).

        Under FSDP the norm is over the sharded gradients of every rank: the FSDP root's own
        ``clip_grad_norm_`` (``torch.nn.utils.clip_grad_norm_`` on a shard is wrong, and
        Lightning's FSDP precision plugin refuses it). Elsewhere DDP has already averaged the
        gradients, so every rank computes the same norm.
        """
        limit = max_norm if max_norm else math.inf
        root = getattr(self.trainer.strategy, "model", None)
        try:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        except ImportError:  # pragma: no cover - torch without distributed
            FSDP = ()
        if FSDP and isinstance(root, FSDP):
            return root.clip_grad_norm_(limit)
        params = [p for p in self.policy.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        return torch.nn.utils.clip_grad_norm_(params, limit)

    def _gather_ranks(self, x: torch.Tensor) -> torch.Tensor:
        """(...) -> (world, ...) every rank's ``x`` (on this rank's device), back on x's device."""
        if self.trainer.world_size == 1:
            return x[None]
        return self.all_gather(x.to(self.device)).to(x.device)

    def _rank_algo_cfg(self) -> dict:
        """``algo`` with this rank's share of the GLOBAL ``prompts_per_minibatch`` (verl's
        ppo_mini_batch_size): every rank steps on prompts_per_minibatch / world_size of its
        groups, so one optimiser step sees prompts_per_minibatch groups over all ranks. A plain
        dict, this rank's own copy (``self.algo_cfg`` is left as configured)."""
        world = max(1, int(self.trainer.world_size)) if self._trainer is not None else 1
        a = OmegaConf.to_container(self.algo_cfg)
        a["prompts_per_minibatch"] = max(1, int(a["prompts_per_minibatch"]) // world)
        return a

    def _skip_rollout_batch(self, b: int) -> int:
        """Skip every optimiser step of this rollout batch (non-finite rewards); -> steps."""
        opt = self.optimizers()
        steps = math.ceil(b / self._rank_algo_cfg()["prompts_per_minibatch"])
        steps *= self.algo_cfg.num_iterations
        for _ in range(steps):
            _skipped_step(opt)
        self.skipped_steps += steps
        return steps

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["grace_counters"] = {
            "skipped_steps": self.skipped_steps,
            "num_tokens": self.num_tokens,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        counters = checkpoint.get("grace_counters", {})
        self.skipped_steps = int(counters.get("skipped_steps", 0))
        self.num_tokens = int(counters.get("num_tokens", 0))

    # ------------------------------------------------------------------ logging
    def rollout_metrics(self, ro, terms, rewards, truncated) -> dict[str, float]:
        """TRL's names and reductions, over the GATHERED batch (every rank's groups).

        ``reward``, ``reward_std`` (mean within-group std; batch std with scale_rewards=batch, as
        TRL), ``rewards/<term>/mean`` and ``/std`` (over rollouts), ``frac_reward_zero_std``,
        ``completions/*``, ``num_tokens`` (prompt + completion tokens seen so far, all ranks);
        ours: ``rewards/<term>/group_std`` (mean within-group std of the term).
        """
        lengths = self._gather(ro.lengths.float())  # (N_global,)
        finished = self._gather(ro.finished.float()).bool()
        clipped = self._gather(truncated.float())  # (B_global, K)
        rewards = self._gather(rewards.float())  # (B_global, K)
        prompt_len = ro.prompt_mask.sum(-1).float()[ro.row_to_prompt]  # (N,)
        step_tokens = float(self._gather((prompt_len + ro.lengths.float()).sum()[None]).sum())
        self.num_tokens += int(step_tokens)
        if self.algo_cfg.scale_rewards == "batch":
            reward_std = _nanstd(rewards)
        else:
            reward_std = reward_fns.group_std(rewards).mean()
        done = lengths[finished]
        m: dict[str, float] = {
            "reward": float(torch.nanmean(rewards)),
            "reward_std": float(reward_std),
            "frac_reward_zero_std": float(adv_fns.zero_std_groups(rewards).float().mean()),
            "completions/mean_length": float(lengths.mean()),
            "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": float(clipped.mean()),
            "completions/mean_terminated_length": float(done.mean()) if done.numel() else 0.0,
            "completions/min_terminated_length": float(done.min()) if done.numel() else 0.0,
            "completions/max_terminated_length": float(done.max()) if done.numel() else 0.0,
            "num_tokens": float(self.num_tokens),
        }
        for name, t in terms.items():
            t = self._gather(t.float())  # (B_global, K)
            m[f"rewards/{name}/mean"] = float(torch.nanmean(t))
            m[f"rewards/{name}/std"] = float(_nanstd(t))
            if name != "total":
                m[f"rewards/{name}/group_std"] = float(reward_fns.group_std(t).mean())
        # collapse diagnostics (rl/diagnostics.py) over the gathered batch; ids padded by
        # _gather get mask 0, so the padding never counts as text
        b, k = len(ro.prompt_ids), self.rollout_cfg["num_generations"]
        m.update(
            collapse_metrics(
                self._gather(ro.response_ids),
                self._gather(ro.response_mask),
                self._gather(ro.embeddings.view(b, k, -1).float()),
                k,
            )
        )
        return m

    def maybe_log_table(self, batch, ro, terms, rewards, advantages):
        every = self.logging_cfg.get("table_every_n_steps", 0)
        if not every or self.table_path is None or not self.trainer.is_global_zero:
            return
        rollout_index = self.global_step // max(1, self.steps_per_rollout())
        if (rollout_index - 1) % every:
            return
        k = self.rollout_cfg["num_generations"]
        texts = self.policy_texts(batch)
        rationales = ro.response_texts(self.tokenizer)
        rows = []
        for i, text in enumerate(texts):
            for j in range(k):
                r = i * k + j
                row = {
                    "step": int(self.global_step),
                    "text": text,
                    "rationale": rationales[r],
                    "length": int(ro.lengths[r]),
                    "finished": bool(ro.finished[r]),
                    "reward": float(rewards[i, j]),
                    "advantage": float(advantages[i, j]),
                }
                row.update({f"rewards/{n}": float(t[i, j]) for n, t in terms.items()})
                rows.append(row)
        self.table_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.table_path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        for logger in self.loggers:
            if hasattr(logger, "log_table"):
                cols = list(rows[0])
                logger.log_table(
                    "rationales",
                    columns=cols,
                    data=[[r[c] for c in cols] for r in rows],
                    step=self.global_step,
                )

    def steps_per_rollout(self) -> int:
        # global prompts / global mini-batch = per-rank prompts / per-rank mini-batch
        b = self.trainer.datamodule.prompts_per_step if self.trainer.datamodule else 1
        a = self.algo_cfg
        return math.ceil(b / a.prompts_per_minibatch) * a.num_iterations

    # ------------------------------------------------------------------ export
    def export(self, directory: str | Path) -> Path:
        """``save_pretrained`` the policy and tokenizer; loadable by plain transformers."""
        meta = {
            "system_prompt": self.prompt_cfg.system_prompt,
            "max_prompt_tokens": self.prompt_cfg.max_prompt_tokens,
            "backbone": self.backbone_cfg.name,
            "pooling": "mean over text + assistant header + rationale (system prompt excluded)",
            "rollout": {
                k: self.rollout_cfg[k]
                for k in ("temperature", "max_new_tokens")
                if k in self.rollout_cfg
            },
            "global_step": int(self.global_step),
            "peft": self.peft_cfg or None,
        }
        return save_policy(self.policy, self.tokenizer, directory, meta, bool(self.peft_cfg))


def _select_rows(out: RolloutBatch, rows: torch.Tensor, num_prompts: int) -> RolloutBatch:
    """The first ``num_prompts`` prompts' rows (the policy rows) of a rollout batch."""
    return RolloutBatch(
        prompt_ids=out.prompt_ids[:num_prompts],
        prompt_mask=out.prompt_mask[:num_prompts],
        row_to_prompt=out.row_to_prompt[rows],
        response_ids=out.response_ids[rows],
        response_mask=out.response_mask[rows],
        finished=out.finished[rows],
        temperatures=out.temperatures[rows],
        logprobs=None if out.logprobs is None else out.logprobs[rows],
        pooled=None if out.pooled is None else out.pooled[rows],
        sampler_logprobs=None if out.sampler_logprobs is None else out.sampler_logprobs[rows],
    )


def _pad_negatives(flat: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """(sum M_i, D) -> (B, max M, D); missing negatives are zero vectors (cosine 0, no effect)."""
    m = max(counts) if counts else 0
    out = flat.new_zeros(len(counts), m, flat.size(-1))
    start = 0
    for i, c in enumerate(counts):
        out[i, :c] = flat[start : start + c]
        start += c
    return out


def _nanstd(x: torch.Tensor) -> torch.Tensor:
    x = x[~torch.isnan(x)]
    return x.std() if x.numel() > 1 else x.new_zeros(())


def _skipped_step(opt) -> None:
    """A skipped optimiser step: Lightning counts it (global_step, progress) but the wrapped
    optimiser's ``step`` does not run, so weights and optimiser state stay as they are."""
    inner = opt.optimizer
    own = "step" in vars(inner)
    saved = vars(inner).get("step")

    def no_step(closure=None, **kwargs):
        return closure() if closure is not None else None

    inner.step = no_step
    try:
        opt.step()
    finally:
        if own:
            inner.step = saved
        else:
            del inner.step
