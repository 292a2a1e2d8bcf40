"""ContrastiveModule: the paper's contrastive baselines, trained without rationales (notes §2).

- ``infonce``: the paper's "w/ CL training" row (Table 1). Supervised InfoNCE over (query,
  positive, hard negatives) triplets. Each query's candidates are every positive and every hard
  negative in the batch: in-batch negatives plus hard negatives, as in supervised SimCSE
  (Gao et al. 2021, §5).
- ``simcse``: the paper's "w/ SimCSE" row (Table 2). Unsupervised SimCSE: each sentence is
  encoded twice in train mode, and the two dropout masks make the positive pair. The batch's
  other sentences are the negatives.

The paper gives no recipe for either baseline, so the defaults are SimCSE's (conf/method/*.yaml).
The embedding is GRACE's Base mode, with gradient: the chat template with the same system prompt
and the text as the user turn, mean-pooled over the last-layer hidden states after the system
prompt (text + assistant header). Evaluate a model trained here with ``eval.py mode=base``.

Batch: ``data.prompts_per_step`` texts a step over ALL ranks (global, as GRACE's rollout batch);
each rank trains on ``prompts_per_step / world_size`` of them (the datamodule splits it), and its
negatives come from that per-rank batch; nothing is gathered across ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Timer
from torch import Tensor

from grace_lightning.embedding import masked_mean_pool
from grace_lightning.errors import ConfigError
from grace_lightning.export.policy import save_policy
from grace_lightning.models.backbone import BackboneConfig, load_backbone
from grace_lightning.prompts import ChatPrompter
from grace_lightning.rollout.engine import left_pad, pooling_mask, positions_from_mask
from grace_lightning.schema import OptimConfig, PromptConfig, typed

log = logging.getLogger(__name__)

OBJECTIVES = {"infonce": "sup", "simcse": "unsup"}  # objective -> the data it trains on


def info_nce(anchor: Tensor, candidates: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """InfoNCE with ``candidates[i]`` as anchor i's positive and every other row as a negative.

    anchor (B, D), candidates (C, D) with C >= B -> (loss, top-1 accuracy), both scalars.
    The logits are cos(anchor_i, candidate_j) / tau.
    """
    logits = F.normalize(anchor, dim=-1) @ F.normalize(candidates, dim=-1).T / tau  # (B, C)
    target = torch.arange(anchor.size(0), device=anchor.device)  # (B,)
    loss = F.cross_entropy(logits, target)
    acc = (logits.argmax(-1) == target).float().mean()
    return loss, acc.detach()


def enable_dropout(model, attention: float | None = None, hidden: float | None = None) -> int:
    """Add SimCSE's noise to decoders that ship with dropout 0 (Llama, Qwen2/3, SmolLM2).

    attention: dropout on the attention probabilities. It sets ``attention_dropout`` on every
        attention module, which HF's Llama/Qwen attention reads in train mode (LLM2Vec's
        SimCSE step sets the same value through the model config: 0.3). None keeps the model's.
    hidden: dropout on each sub-layer's output before the residual add (``o_proj`` and MLP
        outputs: the positions of BERT's ``hidden_dropout_prob``, SimCSE's p = 0.1). Applied
        through forward hooks.
    The saved config is untouched, so the export runs without dropout. Returns the number of
    modules changed.
    """
    changed = 0
    for name, module in model.named_modules():
        if attention is not None and isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = float(attention)
            changed += 1
        if hidden and (name.endswith(".o_proj") or name.endswith(".mlp")):
            module.register_forward_hook(_dropout_hook(float(hidden)))
            changed += 1
    if (attention or hidden) and not changed:
        raise ConfigError(
            "model.dropout: no attention module with `attention_dropout` and no `o_proj`/`mlp` "
            "module found in this backbone; set model.dropout.attention/hidden to null"
        )
    return changed


def _dropout_hook(p: float):
    def hook(module, inputs, output):
        return F.dropout(output, p=p, training=module.training)

    return hook


class ContrastiveModule(L.LightningModule):
    """Contrastive fine-tuning baselines (module doc). Arguments come from conf/method/*.yaml."""

    embedding_mode = "base"  # how to evaluate it: no rationale (FinalEvaluation, eval.py mode=)

    def __init__(
        self,
        backbone: dict,
        prompt: dict,
        optim: dict,
        objective: str = "infonce",
        data_mode: str | None = None,
        tau: float = 0.05,
        dropout: dict | None = None,
        lr_schedule: str = "linear",
        warmup_steps: int = 0,
        max_text_tokens: int | None = None,
        peft: dict | None = None,
        gradient_checkpointing: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        check_args(objective, data_mode, tau, lr_schedule)
        self.objective, self.tau = objective, float(tau)
        self.backbone_cfg = BackboneConfig(**dict(backbone))
        self.prompt_cfg, self.optim_cfg = typed(PromptConfig, prompt), typed(OptimConfig, optim)
        self.lr_schedule, self.warmup_steps = lr_schedule, int(warmup_steps)
        self.policy, self.tokenizer = load_backbone(self.backbone_cfg)
        if self.optim_cfg.master_weights_fp32 and self.policy.dtype != torch.float32:
            self.policy.float()  # fp32 master weights; compute runs in bf16 under autocast
        self.dropout_cfg = dict(dropout or {})
        enable_dropout(
            self.policy, self.dropout_cfg.get("attention"), self.dropout_cfg.get("hidden")
        )
        self.peft_cfg = dict(peft or {})
        if gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
            self.policy.config.use_cache = False
            if self.peft_cfg:
                self.policy.enable_input_require_grads()  # frozen embeddings: let grads reach LoRA
        if self.peft_cfg:
            from grace_lightning.models.lora import wrap_lora

            self.policy = wrap_lora(self.policy, self.peft_cfg)
        self.prompter = training_prompter(
            self.tokenizer,
            self.prompt_cfg.system_prompt,
            self.prompt_cfg.max_prompt_tokens,
            max_text_tokens,
        )

    def on_train_epoch_start(self) -> None:
        # from_pretrained returns eval mode and Lightning keeps module modes as found: without
        # this, SimCSE's dropout (and LoRA dropout) would silently stay off
        self.policy.train()

    # ------------------------------------------------------------------ embedding
    def embed(self, texts: list[str]) -> Tensor:
        """Texts -> (N, D) fp32 embeddings, with gradient (dropout active in train mode)."""
        ids, mask = left_pad(self.prompter.encode(texts), self.tokenizer.pad_token_id, self.device)
        hidden = (
            self.policy.get_decoder()(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions_from_mask(mask),
                use_cache=False,  # one pass, no decoding: no KV cache to build or hold
            )
        ).last_hidden_state  # (N, T, D)
        return masked_mean_pool(hidden, pooling_mask(mask, self.prompter.system_len))  # (N, D)

    # ------------------------------------------------------------------ step
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if self.objective == "infonce":
            loss, acc, b = self._infonce_step(batch)
        else:
            loss, acc, b = self._simcse_step(batch)
        self.log("loss", loss, prog_bar=True, batch_size=b)
        self.log("train/acc", acc, prog_bar=True, batch_size=b)
        self.log("lr", self.optimizers().param_groups[0]["lr"], batch_size=b)
        return loss

    def _infonce_step(self, batch) -> tuple[Tensor, Tensor, int]:
        queries, positives = list(batch["query"]), list(batch["positive"])
        negatives = [n for negs in batch["negatives"] for n in negs]  # all hard negatives, flat
        b = len(queries)
        emb = self.embed(queries + positives + negatives)  # (2B + N, D), one forward
        loss, acc = info_nce(emb[:b], emb[b:], self.tau)  # candidates: B positives + N negatives
        return loss, acc, b

    def _simcse_step(self, batch) -> tuple[Tensor, Tensor, int]:
        texts = list(batch["text"])
        b = len(texts)
        emb = self.embed(texts + texts)  # (2B, D): two dropout masks of the same sentences
        loss, acc = info_nce(emb[:b], emb[b:], self.tau)
        return loss, acc, b

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self):
        o = self.optim_cfg
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            params,
            lr=o.lr,
            weight_decay=o.weight_decay,
            betas=tuple(o.betas),
            eps=o.eps,
        )
        total = self.trainer.estimated_stepping_batches  # inf without max_steps/max_epochs
        factor = lr_factor(self.lr_schedule, self.warmup_steps, total, self._budget_left)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _budget_left(self) -> float | None:
        """Fraction of ``trainer.max_time`` still left (Lightning's Timer, whose elapsed time
        survives a resume), or None without a time budget."""
        timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)
        if timer is None or timer._duration is None:
            return None
        return 1.0 - timer.time_elapsed("train") / timer._duration

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ):
        clip = gradient_clip_val or self.optim_cfg.grad_clip
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    # ------------------------------------------------------------------ export
    def export(self, directory: str | Path) -> Path:
        """``save_pretrained`` model + tokenizer + ``grace_config.json``, like GraceModule."""
        meta = {
            "system_prompt": self.prompt_cfg.system_prompt,
            "max_prompt_tokens": self.prompt_cfg.max_prompt_tokens,
            "backbone": self.backbone_cfg.name,
            "method": self.objective,
            "embedding_mode": self.embedding_mode,
            "pooling": "mean over text + assistant header, no rationale (system prompt excluded)",
            "tau": self.tau,
            "global_step": int(self.global_step),
            "peft": self.peft_cfg or None,
        }
        return save_policy(self.policy, self.tokenizer, directory, meta, bool(self.peft_cfg))


def training_prompter(
    tokenizer, system_prompt: str | None, max_prompt_tokens: int, max_text_tokens: int | None
) -> ChatPrompter:
    """The chat prompter, with texts cut to ``max_text_tokens`` (template excluded) in training
    (SimCSE trains on 32 tokens); evaluation keeps ``prompt.max_prompt_tokens``."""
    prompter = ChatPrompter(tokenizer, system_prompt, max_prompt_tokens)
    if max_text_tokens:
        template = len(prompter.encode([""])[0])  # head (system prompt) + tail tokens
        if template + max_text_tokens < max_prompt_tokens:
            prompter = ChatPrompter(tokenizer, system_prompt, template + max_text_tokens)
    return prompter


def check_args(objective: str, data_mode: str | None, tau: float, lr_schedule: str) -> None:
    """Fail at startup, naming what to change."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"model.objective={objective!r}: use method=infonce or method=simcse")
    need = OBJECTIVES[objective]
    if data_mode is not None and data_mode != need:
        raise ConfigError(
            f"method={objective} trains on {need} data but data.mode={data_mode!r}: drop the "
            f"reward={data_mode} override (method={objective} selects reward={need})"
        )
    if tau <= 0:
        raise ConfigError(f"model.tau={tau}: the contrastive temperature must be > 0 (SimCSE 0.05)")
    if lr_schedule not in ("constant", "linear"):
        raise ConfigError(f"model.lr_schedule={lr_schedule!r}: use constant or linear")


def lr_factor(
    schedule: str,
    warmup_steps: int,
    total_steps: float,
    budget_left: Callable[[], float | None] | None = None,
):
    """Multiplier of the base lr at each optimiser step: linear warmup, then constant or linear
    decay to 0 (HF Trainer's default schedule, which SimCSE uses). The decay ends at
    ``total_steps`` or, under a wall-time budget (``trainer.max_time``), when the budget ends,
    whichever comes first: ``budget_left()`` is the fraction of the budget still left (None: no
    budget). A run stopped by ``max_time`` thus always ends its decay at lr 0, whatever the
    machine's speed, instead of being cut mid-schedule or decaying too early."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        left = []
        if 0 < total_steps < float("inf"):
            left.append((total_steps - step) / max(1.0, total_steps - warmup_steps))
        by_time = budget_left() if budget_left is not None else None
        if by_time is not None:
            left.append(by_time)
        return max(0.0, min(left)) if left else 1.0

    return factor
