"""vLLM rollouts (``rollout.engine=vllm``): vLLM samples, the training model embeds and scores.

Colocated, as TRL's ``vllm_mode="colocate"`` and verl's hybrid engine: ONE ``vllm.LLM`` lives in
the training process (each DDP rank its own), created on first use and shared by every engine
object of the process that asks for the same model (`shared_llm`). Per rollout batch:

1. weight sync (`VLLMRolloutEngine.sync_weights`, called by the module when the policy changed
   since the last sync, i.e. once after the optimiser steps of a rollout batch): the trainer's
   parameters, cast to the engine's dtype, go into vLLM's in-place reload
   (``worker.reload_weights(weights_iterator=..., is_checkpoint_format=True)``; the model
   runner's ``load_weights`` that TRL calls fails on the CPU backend, which repacks linear
   weights), then the prefix cache is reset. LoRA: the adapters are merged for the copy and
   unmerged after (TRL's ``_move_model_to_vllm``); FSDP: the full parameters are gathered with
   ``summon_full_params`` outside any sharded forward. Logged as ``time/weight_sync``;
2. sampling: one request per prompt with ``n`` = its number of samples, ``SamplingParams(seed=)``
   from the prompt's seed (vLLM gives the n children their own streams from it), the same
   temperature (0 = greedy) / top-p / top-k / ``max_new_tokens`` / EOS ids / ``ignore_eos`` as
   `HFRolloutEngine`; prefix caching on (every prompt starts with the system prompt); vLLM returns
   each sampled token's log-prob after temperature (``logprobs_mode="processed_logprobs"``);
3. scoring: ONE no-grad pass of the training model over the sampled tokens (shared prompt once
   per group: `rl.joint.rows_logprobs_and_embedding`, the loss pass's own code) gives the pooled
   embeddings and the PPO "old" log-probs, so rewards and the PPO ratio never depend on vLLM's
   kernels. vLLM's log-probs are kept as ``RolloutBatch.sampler_logprobs`` for the mismatch
   metrics (`sampler_metrics`, TRL's names) and the optional truncated importance sampling
   (`tis_weights`, ``rollout.vllm.tis_cap``).

On a GPU with vLLM's sleep mode (``rollout.vllm.sleep``), the engine's KV cache is released and
its weights offloaded between rollouts (``LLM.sleep(level=1)``; ``wake_up`` before the next).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from grace_lightning.rollout.engine import (
    ProgressFn,
    RolloutBatch,
    _per_prompt,
    left_pad,
)
from grace_lightning.schema import VllmConfig, typed  # the one definition of `rollout.vllm`

__all__ = [
    "VllmConfig",
    "VLLMRolloutEngine",
    "sampler_metrics",
    "shared_llm",
    "tis_weights",
    "trainer_weights",
    "vllm_model_path",
]

_LLMS: dict[tuple, object] = {}  # one engine per (model, dtype, ...) in this process


def shared_llm(model_path: str, cfg: VllmConfig, max_model_len: int):
    """The process's ``vllm.LLM`` for ``model_path`` (created on first call, then reused)."""
    key = (str(model_path), cfg.dtype, cfg.enforce_eager, cfg.enable_prefix_caching, max_model_len)
    if key in _LLMS:
        return _LLMS[key]
    # in-process engine core (colocated): no engine subprocess, no IPC of weights
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(cfg.kv_cache_gb)))  # GiB, CPU
    from vllm import LLM
    from vllm.platforms import current_platform

    kwargs: dict = {}
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # each rank runs its own engine on its own device (DDP): vLLM joins the existing
        # torch.distributed world instead of starting one (TRL's colocate mode does the same)
        kwargs["distributed_executor_backend"] = "external_launcher"
        dist = torch.distributed
        os.environ["RANK"] = str(dist.get_rank())  # vLLM's env:// init reads these
        os.environ["WORLD_SIZE"] = str(dist.get_world_size())
        os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))
        kwargs["seed"] = 0  # sampling seeds are per request; this one only seeds vLLM's init
    sleep = cfg.sleep and current_platform.is_sleep_mode_available()
    llm = LLM(
        model=str(model_path),
        dtype=cfg.dtype,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        max_model_len=max_model_len,
        enforce_eager=cfg.enforce_eager,
        enable_prefix_caching=cfg.enable_prefix_caching,
        enable_sleep_mode=sleep,
        # whole prompts per scheduler step: a seeded request whose prefill is split over steps
        # crashes vLLM 0.32's CPU runner ("CPU Generator does not use offset")
        enable_chunked_prefill=False,
        logprobs_mode="processed_logprobs",
        **kwargs,
    )
    llm._grace_sleep = sleep  # type: ignore[attr-defined]
    _LLMS[key] = llm
    return llm


class _NoWeightsOfTheirOwn(logging.Filter):
    """Drops vLLM's layerwise-reload warning ``"<layer>: Failed to load weights"`` for the layers
    that have no checkpoint tensor of their own: the rotary embedding (computed buffers) and, on a
    tied model, the LM head, which IS the embedding's weight (tests/test_vllm.py checks that it
    follows every sync). Any other layer's warning still shows."""

    def __init__(self, tied: bool):
        super().__init__()
        self.quiet = {"RotaryEmbedding"} | ({"ParallelLMHead"} if tied else set())

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.endswith(": Failed to load weights") and msg.split(":", 1)[0] in self.quiet)


def _quiet_reload_warnings(model) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    tied = bool(getattr(base.config, "tie_word_embeddings", False))
    reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    for old in [f for f in reload_log.filters if isinstance(f, _NoWeightsOfTheirOwn)]:
        reload_log.removeFilter(old)  # the model being synced decides (tied or not)
    reload_log.addFilter(_NoWeightsOfTheirOwn(tied))


def trainer_weights(model, dtype: torch.dtype, fsdp_root=None) -> contextlib.AbstractContextManager:
    """Context manager yielding an iterator of ``(hf_name, tensor)``: the weights vLLM loads.

    Plain model: its parameters by checkpoint name (tied weights once). LoRA (peft): adapters
    merged in for the copy (unmerged on exit), names without peft's prefixes, the adapter tensors
    left out. FSDP (``fsdp_root``: the strategy's wrapped root; the parameters are flat shards):
    gathered with ``summon_full_params`` on every rank, outside any sharded forward.
    """
    return _TrainerWeights(model, dtype, fsdp_root)


class _TrainerWeights:
    def __init__(self, model, dtype, fsdp_root=None):
        self.model, self.dtype, self.fsdp_root = model, dtype, fsdp_root
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        model = self.model
        fsdp = _fsdp_root(self.fsdp_root) if self.fsdp_root is not None else _fsdp_root(model)
        if fsdp is not None:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            self.stack.enter_context(FSDP.summon_full_params(fsdp, writeback=False))
        peft = hasattr(model, "merge_adapter") and hasattr(model, "peft_config")
        if peft:
            model.merge_adapter()
            self.stack.callback(model.unmerge_adapter)
        return self._named(model, peft)

    def _named(self, model, peft: bool) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in model.named_parameters():
            for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
                name = name.replace(wrapper, "")
            if peft:
                if "lora_" in name or "original_module" in name:
                    continue
                name = name.removeprefix("base_model.model.").replace(".base_layer", "")
                name = name.replace(".modules_to_save.default", "")
            if not torch.is_floating_point(tensor):
                continue
            yield name, tensor.detach().to(self.dtype, copy=True)  # the caller may keep it

    def __exit__(self, *exc):
        self.stack.close()
        return False


def vllm_model_path(backbone_cfg, policy, tokenizer) -> str:
    """A directory (or Hub id) vLLM can build the policy's architecture from.

    hub: ``backbone.pretrained``; gguf (the embedded SmolLM2): its converted safetensors dir;
    tiny: config + tokenizer + the initial weights saved once under the GRACE cache. The weights
    only matter until the first sync, which replaces them with the policy's.
    """
    from grace_lightning.models.backbone import cache_root, convert_gguf

    if backbone_cfg.source == "hub":
        return str(backbone_cfg.pretrained)
    if backbone_cfg.source == "gguf":
        return str(convert_gguf(backbone_cfg))
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    digest = hashlib.sha256(base.config.to_json_string().encode()).hexdigest()[:12]
    target = cache_root() / "models" / f"tiny-vllm-{digest}"
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
        base.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another rank got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _fsdp_root(model):
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover
        return None
    if isinstance(model, FSDP):
        return model
    for m in model.modules():
        if isinstance(m, FSDP):
            return m
    return None


class VLLMRolloutEngine:
    """`RolloutEngine` on a colocated ``vllm.LLM`` (module docstring).

    model: the training policy (scoring pass, weight source); tokenizer: its tokenizer;
    model_path: a directory/Hub id vLLM can load with the policy's architecture (its weights are
    replaced by the policy's at the first `sync_weights`). Sampling knobs as `HFRolloutEngine`.
    """

    def __init__(
        self,
        model,
        tokenizer,
        model_path: str,
        max_new_tokens: int = 2048,
        top_p: float = 1.0,
        top_k: int = 0,
        eos_token_ids: list[int] | None = None,
        ignore_eos: bool = False,
        max_prompt_tokens: int = 1024,
        vllm: VllmConfig | dict | None = None,
        progress: ProgressFn | None = None,
    ):
        from grace_lightning.models.backbone import eos_token_ids as _eos

        self.model = model
        self.tokenizer = tokenizer
        self.model_path = str(model_path)
        self.max_new_tokens = max_new_tokens
        self.top_p, self.top_k = top_p, top_k
        self.eos_ids = eos_token_ids or _eos(model, tokenizer)
        self.ignore_eos = ignore_eos
        self.pad_id = tokenizer.pad_token_id
        self.cfg = typed(VllmConfig, vllm)  # a dataclass, dict or DictConfig; absent keys: defaults
        self.max_model_len = self.cfg.max_model_len or (max_prompt_tokens + max_new_tokens)
        self.progress = progress
        self.last_sync_s = 0.0  # seconds of the last weight sync
        self.last_score_s = 0.0  # seconds of the last scoring pass
        self._llm = None

    # ------------------------------------------------------------------ engine
    @property
    def llm(self):
        if self._llm is None:
            self._llm = shared_llm(self.model_path, self.cfg, self.max_model_len)
        return self._llm

    @torch.no_grad()
    def sync_weights(self, fsdp_root=None) -> float:
        """Load the training model's current weights into the engine; -> seconds taken.
        ``fsdp_root``: the strategy's FSDP-wrapped root (any other module is ignored)."""
        t0 = time.perf_counter()
        llm = self.llm
        if llm._grace_sleep:
            llm.wake_up(tags=["weights"])
        from grace_lightning.models.backbone import torch_dtype

        _quiet_reload_warnings(self.model)
        with trainer_weights(self.model, torch_dtype(self.cfg.dtype), fsdp_root) as weights:
            llm.collective_rpc(
                "reload_weights",
                kwargs=dict(weights_iterator=weights, is_checkpoint_format=True),
            )
        llm.reset_prefix_cache()  # cached KV was computed with the old weights
        self.last_sync_s = time.perf_counter() - t0
        return self.last_sync_s

    def _sampling_params(self, n: int, temperature: float, seed: int):
        from vllm import SamplingParams

        greedy = temperature <= 0
        return SamplingParams(
            n=n,
            temperature=0.0 if greedy else float(temperature),
            top_p=1.0 if greedy else float(self.top_p),
            top_k=0 if greedy or not self.top_k else int(self.top_k),
            max_tokens=self.max_new_tokens,
            stop_token_ids=list(self.eos_ids),
            ignore_eos=self.ignore_eos,
            seed=None if greedy else int(seed),
            logprobs=0,  # the sampled token's own log-prob
            detokenize=False,
            skip_special_tokens=False,
        )

    # ------------------------------------------------------------------ generate
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
        """As `HFRolloutEngine.generate`; ``seeds`` (one per prompt) make the draws reproducible
        (vLLM's streams, not the HF engine's: the two engines sample different rationales)."""
        num_prompts = len(prompt_ids)
        counts = _per_prompt(num_samples, num_prompts, "num_samples")
        temps = _per_prompt(temperature, num_prompts, "temperature")
        if seeds is None:
            seeds = torch.randint(2**62, (num_prompts,), generator=generator).tolist()
        elif len(seeds) != num_prompts:
            raise ValueError(f"seeds has {len(seeds)} entries for {num_prompts} prompts")
        device = next(self.model.parameters()).device
        llm = self.llm
        if llm._grace_sleep:
            llm.wake_up()  # no-op for parts already awake
        t0 = time.perf_counter()
        outputs = llm.generate(
            [{"prompt_token_ids": list(map(int, p))} for p in prompt_ids],
            sampling_params=[
                self._sampling_params(n, t, s) for n, t, s in zip(counts, temps, seeds)
            ],
            use_tqdm=False,
        )
        if llm._grace_sleep:
            llm.sleep(level=1)
        rows_ids, rows_lp, finished = [], [], []
        for out, n in zip(outputs, counts):
            comps = sorted(out.outputs, key=lambda c: c.index)
            if len(comps) != n:
                raise RuntimeError(f"vLLM returned {len(comps)} samples, asked for {n}")
            for c in comps:
                ids = list(c.token_ids)
                rows_ids.append(ids)
                rows_lp.append([_sampled_logprob(d, t) for d, t in zip(c.logprobs or [], ids)])
                finished.append(c.finish_reason == "stop" and not self.ignore_eos)
        tokens = sum(len(r) for r in rows_ids)
        fn = progress or self.progress
        if fn is not None:
            fn(len(rows_ids), len(rows_ids), tokens, time.perf_counter() - t0)

        p_ids, p_mask = left_pad(prompt_ids, self.pad_id, device)  # (P, Lp)
        row_to_prompt = torch.repeat_interleave(
            torch.arange(num_prompts, device=device), torch.tensor(counts, device=device)
        )  # (N,)
        resp, resp_mask = _right_pad(rows_ids, self.pad_id, device)  # (N, R)
        sampler_lp, _ = _right_pad(rows_lp, 0.0, device, torch.float32)  # (N, R)
        temps_t = torch.tensor(temps, dtype=torch.float32, device=device)
        ro = RolloutBatch(
            prompt_ids=p_ids,
            prompt_mask=p_mask,
            row_to_prompt=row_to_prompt,
            response_ids=resp,
            response_mask=resp_mask,
            finished=torch.tensor(finished, dtype=torch.bool, device=device),
            temperatures=temps_t[row_to_prompt],
            logprobs=None,
            pooled=None,
            sampler_logprobs=sampler_lp,
        )
        t1 = time.perf_counter()
        ro.logprobs, ro.pooled = self.score(ro, system_len)
        self.last_score_s = time.perf_counter() - t1
        return ro

    @torch.no_grad()
    def score(self, ro: RolloutBatch, system_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Old log-probs (N, R) and pooled embeddings (N, D) from the training model, whole
        prompts with all their rows per pass, at most ``vllm.score_rows`` rows a pass."""
        from grace_lightning.rl.joint import rows_logprobs_and_embedding

        n, r = ro.response_ids.shape
        device = ro.response_ids.device
        logps = torch.zeros((n, r), dtype=torch.float32, device=device)  # (N, R)
        pooled = None
        for rows in _row_chunks(ro.row_to_prompt, self.cfg.score_rows):
            lp, _, pool = rows_logprobs_and_embedding(self.model, ro, rows, system_len)
            logps[rows, : lp.size(1)] = lp.float()
            if pooled is None:
                pooled = torch.zeros((n, pool.size(-1)), dtype=torch.float32, device=device)
            pooled[rows] = pool.float()
        if pooled is None:  # no rows
            pooled = torch.zeros((0, 0), device=device)
        return logps, pooled


def _sampled_logprob(entry, token: int) -> float:
    if not entry:
        return 0.0
    lp = entry.get(token)
    return float(lp.logprob if lp is not None else 0.0)


def _right_pad(rows: list[list], pad, device, dtype=torch.long):
    """Ragged rows -> (N, R) right-padded values and (N, R) long mask."""
    length = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), length), pad, dtype=dtype)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=dtype)
            mask[i, : len(r)] = 1
    return out.to(device), mask.to(device)


def _row_chunks(row_to_prompt: torch.Tensor, max_rows: int | None) -> list[torch.Tensor]:
    """Row indices grouped by whole prompts, at most ``max_rows`` rows a chunk (>= 1 prompt)."""
    prompts = row_to_prompt.unique_consecutive().tolist()
    chunks, cur, size = [], [], 0
    for p in prompts:
        rows = (row_to_prompt == p).nonzero().squeeze(-1)
        if cur and max_rows and size + rows.numel() > max_rows:
            chunks.append(torch.cat(cur))
            cur, size = [], 0
        cur.append(rows)
        size += rows.numel()
    if cur:
        chunks.append(torch.cat(cur))
    return chunks


# ----------------------------------------------------------------------------- mismatch
def sampler_metrics(
    logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor, cap: float | None
) -> dict[str, float]:
    """The trainer/sampler mismatch over the response tokens (TRL's names).

    logprobs: (N, R) the training model's; sampler_logprobs: (N, R) vLLM's; mask: (N, R).
    ``sampling/sampling_logp_difference/{mean,max}``: |trainer - vLLM| per token;
    ``sampling/importance_sampling_ratio/{min,mean,max}``: exp(trainer - vLLM), capped at ``cap``
    when truncated importance sampling is on.
    """
    with torch.autocast(logprobs.device.type, enabled=False):
        m = mask.bool()
        if not m.any():
            return {}
        diff = (logprobs.float() - sampler_logprobs.float())[m]  # (T,)
        ratio = diff.exp()
        if cap:
            ratio = ratio.clamp(max=cap)
        return {
            "sampling/sampling_logp_difference/mean": float(diff.abs().mean()),
            "sampling/sampling_logp_difference/max": float(diff.abs().max()),
            "sampling/importance_sampling_ratio/min": float(ratio.min()),
            "sampling/importance_sampling_ratio/mean": float(ratio.mean()),
            "sampling/importance_sampling_ratio/max": float(ratio.max()),
        }


def tis_weights(
    logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance sampling (Yao et al. 2025; TRL ``vllm_importance_sampling_cap``,
    verl ``rollout_is``): per-token min(exp(trainer - vLLM), cap), fp32. All (N, R); 0 off-mask.

    The samples came from vLLM's distribution, the PPO ratio is taken against the trainer's: the
    weight corrects the policy gradient for that mismatch, truncated so a token vLLM found much
    less likely than the trainer cannot blow the update up.
    """
    with torch.autocast(logprobs.device.type, enabled=False):
        w = (logprobs.float() - sampler_logprobs.float()).exp().clamp(max=cap)  # (N, R)
        return w * mask.float()
