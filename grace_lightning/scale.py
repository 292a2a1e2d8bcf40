"""The memory model of one GRACE rollout batch (bytes per GPU), shared by the startup memory check
(``grace_lightning.presets.check_gpu_memory`` via `predict_config_peak`) and
``bench/paper_scale.py``, which measures CPU points, fits the coefficients (`Coeffs`) and prints
the paper-scale table (docs/scale.md). Arithmetic only: it runs before any weights load.

Quick use::

    from grace_lightning import scale
    scale.estimate("qwen", scale.Recipe(), scale.Setting(gc=True))   # {phase: bytes}
    scale.fits("qwen3", scale.Recipe(), scale.Setting(), 80e9)       # False: full FT, one GPU
    scale.predict_config_peak(cfg, world=1)                          # a composed run config

The model (GiB = 2**30 bytes). P params, T trainable params (LoRA: the adapters), L layers, h
hidden, V vocabulary, lp / r the longest prompt / response of a micro-batch or rollout sub-batch,
kv = 2 x L x kv_heads x head_dim x 2 B: K AND V in bf16 (the rollout and loss-pass caches store K
in V's dtype, ``grace_lightning/rollout/kv.py``; before that fix K was cached in fp32 under
autocast with fp32 weights, 1.5x this). Lightning's bf16-mixed runs autocast with
cache_enabled=False, so no bf16 weight cache persists: each use of a weight casts it again.

    peak    = static + max(rollout, update, optimiser step)
    static  = 4 P (fp32 master weights) + 8 T (AdamW m, v); FSDP over n GPUs: / n, plus the
              gathered root + 2 layers (fp32)
    rollout = kv x slots + kv x 2 rows (lp + r) / L (one layer's assembled keys/values)
              + sample x rows x V (per-step logits, softmax, fp64 CDF) + 2 V h (LM head's bf16
              cast); slots = prompts lp + rows r with rollout.share_prompt_kv (rows (lp + r) off;
              the response part is preallocated to max_new_tokens, EOS or not); the prefill of
              a sub-batch's prompts (prefill x analytic per-token) if larger
    update  = 6 V h (tied LM-head/embedding grads, full FT) + const + the larger of
              forward side: kappa x L x a_s x tokens (GC: L x 4 h x tokens + a_s x tokens)
                          + L x w x passes (bf16 weight casts saved for backward; GC: one layer)
                          + rows lp kv (prompt K/V gathered per row) + lm x chunk x V + 8 h r rows
                          (+ 4 T of earlier micro-batches' gradients when accumulating)
              backward side: 4 T (fp32 grads) + grad_extra x T_layers (bf16 grad buffers)
              tokens = the PADDED rectangle the loss pass runs, the planner's count
              (``rl/update.py padded_tokens``): prompts lp + rows r on the shared-prompt pass,
              rows (lp + r) on full sequences (GC or algo.share_prompt=false)
              (+ 4 T x (terms + 1) on the first algo.log_term_grad_norms_steps steps: each
              loss term's gradient copied for its norm, rl/update.py _add_term_grads)
    optimiser step = 4 T (grads) + 4 T (CUDA foreach AdamW's sqrt(v) copy)

Fitted on CPU points by bench/paper_scale.py: kappa (full, LoRA), grad_extra, lm, lm_bwd, sample,
prefill, two constants; a_s, w per backbone from one real-width layer (`LayerSaved`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

GIB = 1024**3


# ---------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shape:
    """A decoder-only backbone's shape (from its config.json); counts are exact for the four."""

    name: str
    arch: str  # qwen2 | llama | qwen3 (transformers model type)
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool = True
    qkv_bias: bool = False  # Qwen2: bias on q/k/v
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_linear_params(self) -> int:
        """Weights of one layer's seven projections (what autocast casts and LoRA adapts)."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        return h * q + 2 * h * kv + q * h + 3 * h * i

    def layer_params(self) -> int:
        bias = (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        norms = 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        return self.layer_linear_params() + bias + norms

    def embed_params(self) -> int:
        return self.vocab * self.hidden

    def params(self, layers: int | None = None) -> int:
        n = self.layers if layers is None else layers
        head = 0 if self.tied else self.embed_params()
        return self.embed_params() + head + n * self.layer_params() + self.hidden

    def linear_params(self, layers: int | None = None) -> int:
        """Params that go through an autocast-cast matmul: layer projections + the LM head."""
        n = self.layers if layers is None else layers
        return n * self.layer_linear_params() + self.embed_params()

    def lora_params(self, r: int = 16, layers: int | None = None) -> int:
        """LoRA A and B on q, k, v, o, gate, up, down: r x (in + out) each."""
        n = self.layers if layers is None else layers
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        per = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h)
        return n * r * per

    def kv_bytes_per_token(self, layers: int | None = None, nbytes: int = 2) -> int:
        """K + V bytes of one cached token position over ``layers`` layers (bf16: 2 B each)."""
        n = self.layers if layers is None else layers
        return 2 * n * self.kv_dim * nbytes

    @classmethod
    def from_hf_config(cls, config, name: str = "") -> Shape:
        """A transformers config's shape (qwen2 / qwen3 / llama-like decoders)."""
        heads = config.num_attention_heads
        arch = getattr(config, "model_type", "llama")
        return cls(
            name=name or getattr(config, "name_or_path", "") or arch,
            arch=arch if arch in ("qwen2", "qwen3") else "llama",
            vocab=config.vocab_size,
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate=config.intermediate_size,
            tied=bool(getattr(config, "tie_word_embeddings", True)),
            qkv_bias=arch == "qwen2",
            qk_norm=arch == "qwen3",
        )


SHAPES: dict[str, Shape] = {  # keys are the conf/backbone names
    "qwen": Shape("Qwen2.5-1.5B", "qwen2", 151936, 1536, 28, 12, 2, 128, 8960, qkv_bias=True),
    "qwen3b": Shape("Qwen2.5-3B", "qwen2", 151936, 2048, 36, 16, 2, 128, 11008, qkv_bias=True),
    "llama": Shape("Llama-3.2-3B", "llama", 128256, 3072, 28, 24, 8, 128, 8192),
    "qwen3": Shape("Qwen3-4B", "qwen3", 151936, 2560, 36, 32, 8, 128, 9728, qk_norm=True),
}
# a small stand-in for the --tiny smoke mode (same code path, seconds on a CPU)
# (its vocabulary is the tokenizer's: the embedded SmolLM2 tokenizer drives every run here)
TINY = Shape("tiny-qwen2", "qwen2", 49152, 64, 2, 4, 2, 16, 128, qkv_bias=True)


# ------------------------------------------------------------------------------ the recipe
@dataclass(frozen=True)
class Recipe:
    """The rollout batch of one optimiser-step cycle, for the WHOLE job (paper_sup defaults)."""

    prompts: int = 64  # data.prompts_per_step, global (upstream train_batch_size)
    k: int = 8  # rollout.num_generations
    anchors: int = 2  # anchor rollouts per prompt (sup: the query + one hard negative)
    prompt_len: int = 1024  # prompt.max_prompt_tokens (worst case: every prompt this long)
    response_len: int = 2048  # rollout.max_new_tokens (worst case: every response this long)
    minibatch: int = 16  # groups per optimiser step, global (upstream ppo_mini_batch_size)


@dataclass(frozen=True)
class Setting:
    """How the step runs on each GPU."""

    lora: bool = False
    gc: bool = False  # gradient checkpointing (the loss pass then runs full sequences)
    devices: int = 1  # GPUs the job runs on (the batch is divided over them)
    lora_r: int = 16
    share_prompt: bool = True  # algo.share_prompt (prompt once per group in the loss pass)
    shared_prompt_kv: bool = True  # rollout.share_prompt_kv: a prompt's rows read one KV copy
    foreach_adam: bool = True  # torch's CUDA default: sqrt(v) of every tensor at once in step
    sharded: bool = True  # devices > 1: FSDP (weights, grads, AdamW sharded) | False: DDP
    # loss terms whose gradients are copied for their norms (algo.log_term_grad_norms_steps > 0,
    # the first steps only): pg, + joint when algo.contrastive_weight > 0; 0 = steady state
    term_grads: int = 0
    label: str = ""

    @property
    def shards(self) -> int:
        """How many ways weights, gradients and AdamW state are split."""
        return self.devices if self.sharded else 1

    def name(self) -> str:
        parts = ["LoRA" if self.lora else "full FT", "GC" if self.gc else "no GC"]
        kind = "FSDP" if self.sharded else "DDP"
        parts.append(f"{kind} x{self.devices}" if self.devices > 1 else "1 GPU")
        return ", ".join(parts)


@dataclass
class Coeffs:
    """Fitted coefficients (`DEFAULT_COEFFS`: bench/paper_scale.py's fit, docs/scale.md)."""

    kappa_full: float = 1.0  # measured / saved bytes of the layer activations, full FT
    kappa_lora: float = 1.0  # same, LoRA
    grad_extra: float = 4.0  # B per trainable layer param and pass: bf16 cast + its bf16 grad
    lm: float = 20.0  # bytes per (token of one LM-head chunk x vocabulary entry), forward
    lm_bwd: float = 30.0  # same, the chunk's recompute + gradient at the start of the backward
    sample: float = 30.0  # bytes per (rollout row x vocabulary entry), per decode step
    prefill: float = 1.0  # scale on the analytic no-grad prefill transient per prompt token
    update_const: float = 0.0  # bytes (framework overhead seen in the update phase)
    rollout_const: float = 0.0


@dataclass(frozen=True)
class LayerSaved:
    """One layer's saved-for-backward bytes (bench ``layer_saved_bytes``), full FT and LoRA."""

    full_per_token: float
    full_weights: float
    lora_per_token: float
    lora_weights: float

    def per_token(self, lora: bool) -> float:
        return self.lora_per_token if lora else self.full_per_token

    def weights(self, lora: bool) -> float:
        return self.lora_weights if lora else self.full_weights


@dataclass(frozen=True)
class MicroShape:
    """One loss-pass micro-batch as it runs: its rows, distinct prompts, longest prompt and
    longest response (the loss pass pads every row to those)."""

    rows: int
    prompts: int
    prompt_len: int
    response_len: int

    def tokens(self, shared: bool) -> int:
        """Token positions run: the planner's ``rl/update.py padded_tokens``."""
        if shared:
            return self.prompts * self.prompt_len + self.rows * self.response_len
        return self.rows * (self.prompt_len + self.response_len)

    @classmethod
    def worst(cls, rows: int, k: int, prompt_len: int, response_len: int) -> MicroShape:
        """``rows`` rows of whole groups of ``k`` at the longest lengths (EOS off)."""
        return cls(rows, math.ceil(rows / k), prompt_len, response_len)


def lm_chunk_tokens(vocab: int) -> int:
    """Response tokens per LM-head chunk in the loss pass (``rl/policy.py``'s default)."""
    from grace_lightning.rl.policy import LOGITS_CHUNK_BYTES

    return max(1, LOGITS_CHUNK_BYTES // (4 * vocab))


def prefill_per_token(s: Shape) -> float:
    """No-grad transient of one layer per prompt token (bf16 compute, fp32 residual), bytes:
    residual + norm in/out (fp32), q/k/v/attention out (bf16), gate/up/act (bf16), plus the
    engine's fp32 copy of the last hidden state and its masked copy (pooling)."""
    return (
        3 * 4 * s.hidden + 2 * (2 * s.q_dim + 2 * s.kv_dim) + 3 * 2 * s.intermediate + 8 * s.hidden
    )


# ------------------------------------------------------------------------------- the parts
def static_parts(s: Shape, layers: int, st: Setting) -> dict[str, float]:
    """Memory that lives through the whole step (bytes per GPU)."""
    p = s.params(layers)
    t = s.lora_params(st.lora_r, layers) if st.lora else p
    n = st.shards
    parts = {"weights": 4 * p / n, "adam": 8 * t / n}
    if n > 1:  # gathered FSDP units: the root (embeddings, tied LM head) + 2 layers (prefetch)
        parts["fsdp_gathered"] = 4 * (s.embed_params() + 2 * s.layer_params())
    return parts


def kv_slots(rows: int, prompts: int, prompt_len: int, response_len: int, st: Setting) -> int:
    """Cached token positions per layer of a rollout sub-batch at its largest (rollout/budget.py
    ``kv_cost``; the shared system prefix counted once per prompt: a slight over-count)."""
    if st.shared_prompt_kv:
        return prompts * prompt_len + rows * response_len
    return rows * (prompt_len + response_len)


def rollout_parts(
    s: Shape,
    layers: int,
    st: Setting,
    rows: int,
    prompts: int,
    prompt_len: int,
    response_len: int,
    c: Coeffs,
    lay: LayerSaved | None = None,
    transient_tokens: int | None = None,
) -> dict[str, float]:
    """Dynamic rollout memory for ``rows`` rows of ``prompts`` distinct prompts in flight.

    transient_tokens: the largest (active rows x key length) of a decode step, for measured
    batches whose rows ended early (EOS on); None = every row runs ``response_len`` tokens."""
    kv_tok = s.kv_bytes_per_token(layers)
    # the row part is preallocated to max_new_tokens (SegmentedLayer), EOS or not
    kv = kv_tok * kv_slots(rows, prompts, prompt_len, response_len, st)
    # one layer's dense (rows, heads, prompt + response, d) keys and values at a time:
    # SegmentedCache assembles them per layer (index_select + cat); DynamicCache's cat copies
    if transient_tokens is None:
        transient_tokens = rows * (prompt_len + response_len)
    kv += 2 * kv_tok / layers * transient_tokens
    decode = kv + c.sample * rows * s.vocab
    prefill = prompts * prompt_len * (kv_tok + c.prefill * prefill_per_token(s))
    return {
        "kv+sampling" if decode >= prefill else "prefill": max(decode, prefill),
        # Lightning's autocast has no weight cache: the LM head's bf16 cast at each decode step
        "lm_head_cast": 2 * s.embed_params(),
        "const": c.rollout_const,
    }


def micro_tokens(m: MicroShape, st: Setting) -> tuple[int, int, int]:
    """(tokens through the layers, response tokens, prompt rows) of micro-batch ``m``."""
    shared = st.share_prompt and not st.gc  # GC and share_prompt=false: full sequences
    return m.tokens(shared), m.rows * m.response_len, m.prompts if shared else m.rows


def forward_parts(
    s: Shape,
    layers: int,
    st: Setting,
    m: MicroShape,
    c: Coeffs,
    lay: LayerSaved,
    vocab_chunk: int | None,
    backward: bool = False,
) -> dict[str, float]:
    """What one micro-batch's loss forward keeps for its backward, plus the LM-head chunk's
    transient: in the forward, or (``backward``) recomputed with its gradient as the backward
    starts (bytes per GPU)."""
    tokens, resp, _ = micro_tokens(m, st)
    kappa = c.kappa_lora if st.lora else c.kappa_full
    a = lay.per_token(st.lora)
    if st.gc:  # layer inputs (fp32 residual) kept; the backward recomputes one layer at a time
        act = kappa * (layers * 4 * s.hidden * tokens + (a * tokens if backward else 0.0))
    else:
        act = kappa * layers * a * tokens
    chunk = resp if vocab_chunk is None else min(resp, vocab_chunk)
    parts = {
        "activations": act,
        # chunk logits (+ their gradient in the backward) + the response hidden states + the
        # LM head's bf16 weight cast (no autocast cache: made again for every chunk)
        "lm_head": (c.lm_bwd if backward else c.lm) * chunk * s.vocab
        + 8 * s.hidden * resp
        + 2 * s.embed_params(),
    }
    if not st.gc and st.share_prompt:  # each row's gathered prompt K/V (bf16), saved by attention
        parts["kv_gather"] = m.rows * m.prompt_len * s.kv_bytes_per_token(layers)
    # bf16 casts of every layer's weights, saved for the input gradient, once per pass (prompt
    # pass + response pass on the shared-prompt path); with GC one layer's at a time
    passes = 2 if st.share_prompt and not st.gc else 1
    parts["weight_copies"] = lay.weights(st.lora) * (1 if st.gc else layers * passes)
    return parts


def update_parts(
    s: Shape,
    layers: int,
    st: Setting,
    m: MicroShape,
    c: Coeffs,
    lay: LayerSaved,
    vocab_chunk: int | None,
    accumulating: bool = False,
) -> dict[str, float]:
    """Peak of one micro-batch's forward + backward (bytes per GPU): the larger of
    - the end of the forward / start of the backward: what the forward kept (+ the gradients of
      earlier micro-batches when ``accumulating``), and
    - the end of the backward: activations freed, fp32 gradients + bf16 gradient buffers."""
    t = s.lora_params(st.lora_r, layers) if st.lora else s.params(layers)
    grads = 4 * t / st.shards
    t_layers = t - (0 if st.lora else s.embed_params())  # trainable params inside the layers
    # per pass: the saved bf16 weight casts and their bf16 gradients, alive until each layer's
    # backward converts them into fp32 grads (GC: one layer at a time)
    passes = 2 if st.share_prompt and not st.gc else 1
    extra = c.grad_extra * (t_layers / layers if st.gc else passes * t_layers) / st.shards
    # earlier micro-batches' gradients (the tied embedding's are already in tied_grad)
    earlier = 4 * t_layers / st.shards if accumulating else 0.0
    fwd = forward_parts(s, layers, st, m, c, lay, vocab_chunk, backward=True)
    parts = {"const": c.update_const}
    if st.term_grads:  # rl/update.py _add_term_grads: one fp32 copy per term + the one in flight
        parts["term_grads"] = 4 * t * (st.term_grads + 1) / st.shards
    if not st.lora:  # tied embeddings: LM-head and embedding gradients meet (+ bf16 cast grad)
        parts["tied_grad"] = 6 * s.embed_params()
    if sum(fwd.values()) + earlier >= grads + extra + earlier:
        parts.update(fwd)
        if accumulating:
            parts["grads"] = earlier
    else:  # accumulating: the new fp32 grads exist next to the accumulated ones for a moment
        parts.update({"grads": grads + earlier, "grad_extra": extra})
    return parts


def step_parts(s: Shape, layers: int, st: Setting) -> dict[str, float]:
    """The optimiser step: gradients + (CUDA foreach AdamW) one more fp32 copy while it runs."""
    t = s.lora_params(st.lora_r, layers) if st.lora else s.params(layers)
    parts = {"grads": 4 * t / st.shards}
    if st.foreach_adam:
        parts["adam_temp"] = 4 * t / st.shards
    return parts


def subbatch_prompts(rows: int, policy_prompts: int, k: int, anchor_prompts: int) -> int:
    """Distinct prompts in the worst sub-batch of ``rows`` rows (most prompts per row): as many
    one-row anchor prompts as fit, the rest whole policy groups of ``k`` rows."""
    anchors = min(rows, anchor_prompts)
    return anchors + min(policy_prompts, math.ceil((rows - anchors) / k))


# ---------------------------------------------------------------------------- prediction
def predict_peak(
    s: Shape,
    st: Setting,
    recipe: Recipe,
    c: Coeffs | None = None,
    lay: LayerSaved | None = None,
    micro_rows: int | None = None,
    rollout_rows: int | None = None,
    layers: int | None = None,
) -> dict:
    """Peak bytes per GPU of one rollout batch of ``recipe`` in steady state (not the first).

    micro_rows: rows per loss-pass micro-batch (None: the whole mini-batch); rollout_rows: rows
    sampled at once (None: the whole rollout batch). Returns the peak, the phase it is in, each
    phase's total and its parts."""
    c = c or DEFAULT_COEFFS
    lay = lay or layer_saved_for(s)
    n = layers or s.layers
    g = recipe.prompts // st.devices  # policy prompts per GPU
    all_rows = g * (recipe.k + recipe.anchors)
    r = min(rollout_rows or all_rows, all_rows)
    mb_rows = recipe.minibatch // st.devices * recipe.k
    m = min(micro_rows or mb_rows, mb_rows)
    static = static_parts(s, n, st)
    base = sum(static.values())
    prompts = subbatch_prompts(r, g, recipe.k, g * recipe.anchors)
    ro = rollout_parts(s, n, st, r, prompts, recipe.prompt_len, recipe.response_len, c, lay)
    micro = MicroShape.worst(m, recipe.k, recipe.prompt_len, recipe.response_len)
    up = update_parts(s, n, st, micro, c, lay, lm_chunk_tokens(s.vocab), accumulating=m < mb_rows)
    sp = step_parts(s, n, st)
    phases = {
        "rollout": base + sum(ro.values()),
        "update": base + sum(up.values()),
        "optim_step": base + sum(sp.values()),
    }
    worst = max(phases, key=phases.get)
    return {
        "peak": phases[worst],
        "phase": worst,
        "phases": phases,
        "static": static,
        "rollout": ro,
        "update": up,
        "step": sp,
        "micro_rows": m,
        "micro_tokens": micro_tokens(micro, st)[0],
        "rollout_rows": r,
        "kv_slots": kv_slots(r, prompts, recipe.prompt_len, recipe.response_len, st),
    }


# --------------------------------------------------------------- the contrastive baselines
# Chat template + system prompt around a text, in tokens: an upper bound for the four paper
# backbones with upstream's system prompt (Llama-3.2's template adds its date lines, ~75 in all)
TEMPLATE_TOKENS = 96
# texts embedded per batch item: InfoNCE a query, its positive and one hard negative; SimCSE two
# dropout views of a sentence (contrastive.ContrastiveModule._infonce_step / _simcse_step)
TEXTS_PER_ITEM = {"infonce": 3, "simcse": 2}


def contrastive_update_parts(
    s: Shape, layers: int, st: Setting, texts: int, text_len: int, c: Coeffs, lay: LayerSaved
) -> dict[str, float]:
    """One contrastive step's forward + backward (bytes per GPU): ``ContrastiveModule.embed``
    runs the decoder once over every text of the device's batch, left-padded to ``text_len``,
    and pools its last hidden states: the GRACE loss pass's layer model (`update_parts`) on
    full sequences of no response, without the LM head (never called)."""
    m = MicroShape(rows=texts, prompts=texts, prompt_len=text_len, response_len=0)
    flat = replace(st, share_prompt=False, term_grads=0)
    parts = update_parts(s, layers, flat, m, c, lay, vocab_chunk=None)
    parts.pop("lm_head", None)
    if parts.pop("tied_grad", None) is not None:  # full FT: the embedding's dense fp32 gradient
        parts["embed_grad"] = 4 * s.embed_params()  # (no LM-head cast gradient: never called)
    return parts


def predict_contrastive_peak(
    s: Shape,
    st: Setting,
    texts: int,
    text_len: int,
    c: Coeffs | None = None,
    lay: LayerSaved | None = None,
    layers: int | None = None,
) -> dict:
    """Peak bytes per GPU of one InfoNCE / SimCSE step: ``texts`` texts on this GPU (InfoNCE:
    3 per triplet, SimCSE: 2 views per sentence), each at most ``text_len`` tokens. The same
    return shape as `predict_peak` (peak, phase, phases and their parts)."""
    c = c or DEFAULT_COEFFS
    lay = lay or layer_saved_for(s)
    n = layers or s.layers
    static = static_parts(s, n, st)
    base = sum(static.values())
    up = contrastive_update_parts(s, n, st, texts, text_len, c, lay)
    sp = step_parts(s, n, st)
    phases = {"update": base + sum(up.values()), "optim_step": base + sum(sp.values())}
    worst = max(phases, key=phases.get)
    return {
        "peak": phases[worst],
        "phase": worst,
        "phases": phases,
        "static": static,
        "update": up,
        "step": sp,
        "texts": texts,
        "text_len": text_len,
    }


def largest_fitting(fn, hi: int, cap: float) -> int:
    """The largest x in [1, hi] with fn(x) <= cap (fn non-decreasing); 0 if none."""
    if fn(1) > cap:
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fn(mid) <= cap:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _shape(shape: Shape | str) -> Shape:
    return SHAPES[shape] if isinstance(shape, str) else shape


def estimate(
    shape: Shape | str,
    recipe: Recipe = Recipe(),
    setting: Setting = Setting(),
    *,
    micro_rows: int | None = None,
    rollout_rows: int | None = None,
    coeffs: Coeffs | None = None,
) -> dict[str, float]:
    """{phase: bytes per GPU} of one rollout batch, plus ``"peak"`` (the largest)."""
    out = predict_peak(_shape(shape), setting, recipe, coeffs, None, micro_rows, rollout_rows)
    return {**out["phases"], "peak": out["peak"]}


USABLE_FRACTION = 74 / 79.6  # an 80 GB H100 shows 79.6 GiB; CUDA context, workspaces, fragments


def usable_memory(total_bytes: float) -> float:
    """What the model's peak may use of a GPU's ``total_memory`` (the table's 74 of 79.6 GiB)."""
    return USABLE_FRACTION * total_bytes


def fits(
    shape: Shape | str,
    recipe: Recipe,
    setting: Setting,
    device_memory: float,
    **kwargs: Any,
) -> bool:
    """Whether the predicted peak fits ``usable_memory(device_memory)`` (bytes of one GPU)."""
    return estimate(shape, recipe, setting, **kwargs)["peak"] <= usable_memory(device_memory)


def layer_saved_for(s: Shape) -> LayerSaved:
    """The measured `LayerSaved` of a paper backbone; for another shape, Qwen2.5-1.5B's scaled by
    the layer's width (per token: 2 h + intermediate; weights: 2 B per projection weight)."""
    for key, known in SHAPES.items():
        if known == s and key in LAYER_SAVED_DEFAULT:
            return LAYER_SAVED_DEFAULT[key]
    ref, q = LAYER_SAVED_DEFAULT["qwen"], SHAPES["qwen"]
    width = (2 * s.hidden + s.intermediate) / (2 * q.hidden + q.intermediate)
    weights = s.layer_linear_params() / q.layer_linear_params()
    return LayerSaved(
        ref.full_per_token * width,
        ref.full_weights * weights,
        ref.lora_per_token * width,
        ref.lora_weights * weights,
    )


# ------------------------------------------------------------------ a composed run's config
def _get(cfg, key: str, default=None):
    """``cfg``'s value at the dotted ``key`` (a composed DictConfig or plain dicts); ``default``
    where a node is missing or null (the paper recipe's value: `Recipe`, `Setting`)."""
    node = cfg
    for part in key.split("."):
        try:
            node = node.get(part) if hasattr(node, "get") else getattr(node, part)
        except (AttributeError, KeyError):
            return default
        if node is None:
            return default
    return node


def config_shape(cfg) -> Shape | None:
    """The backbone's `Shape`: a paper backbone by name, else its config (no weights)."""
    name = str(_get(cfg, "backbone.name", ""))
    if name in SHAPES:
        return SHAPES[name]
    try:
        from omegaconf import OmegaConf

        from grace_lightning.models.backbone import BackboneConfig, random_init_config

        backbone = BackboneConfig(**OmegaConf.to_container(cfg.backbone, resolve=True))
        return Shape.from_hf_config(random_init_config(backbone), name=name)
    except Exception:  # no shipped shape for it: the check is skipped
        return None


def config_setting(cfg, world: int = 1) -> Setting:
    """How a composed run config runs on each of ``world`` GPUs (LoRA, checkpointing, FSDP,
    prompt sharing, the first steps' per-term gradient copies)."""
    strategy = _get(cfg, "trainer.strategy", "")
    target = str(_get(strategy, "_target_", strategy) if hasattr(strategy, "get") else strategy)
    peft = _get(cfg, "peft")
    gc = bool(_get(cfg, "model.gradient_checkpointing", False)) or bool(
        hasattr(strategy, "get") and _get(strategy, "activation_checkpointing", False)
    )
    return Setting(
        lora=bool(peft),
        gc=gc,
        devices=max(1, int(world)),
        lora_r=int(_get(peft, "r", Setting.lora_r)) if peft else Setting.lora_r,
        share_prompt=bool(_get(cfg, "algo.share_prompt", Setting.share_prompt)),
        shared_prompt_kv=bool(_get(cfg, "rollout.share_prompt_kv", Setting.shared_prompt_kv)),
        sharded="fsdp" in target.lower(),
        term_grads=(  # rl/update.py: pg + joint copies, only with the joint loss on
            2
            if int(_get(cfg, "algo.log_term_grad_norms_steps", 0) or 0) > 0
            and float(_get(cfg, "algo.contrastive_weight", 0.0) or 0.0) > 0
            else 0
        ),
    )


def config_recipe(cfg, world: int = 1) -> tuple[Recipe, Setting, int | None, int | None]:
    """(recipe, setting, micro rows, rollout rows) of a composed run config on ``world`` GPUs.

    Batch sizes are global (data.prompts_per_step, algo.prompts_per_minibatch); micro rows are
    the smaller of algo.micro_batch_size and the rows whose padded rectangle fits
    algo.max_tokens_per_micro_batch; rollout rows the smaller of rollout.max_rows_per_batch and
    the rows whose KV fits rollout.max_kv_tokens (None: no limit)."""
    st = config_setting(cfg, world)
    k = int(_get(cfg, "rollout.num_generations", Recipe.k))
    recipe = Recipe(
        prompts=int(_get(cfg, "data.prompts_per_step", Recipe.prompts)),
        k=k,
        anchors=2 if str(_get(cfg, "reward.mode", "sup")) == "sup" else 1,
        prompt_len=int(_get(cfg, "prompt.max_prompt_tokens", Recipe.prompt_len)),
        response_len=int(_get(cfg, "rollout.max_new_tokens", Recipe.response_len)),
        minibatch=int(_get(cfg, "algo.prompts_per_minibatch", Recipe.minibatch)),
    )
    lp, r = recipe.prompt_len, recipe.response_len
    micro = _get(cfg, "algo.micro_batch_size")
    budget = _get(cfg, "algo.max_tokens_per_micro_batch")
    if budget is not None:
        mb_rows = max(1, recipe.minibatch // st.devices * k)
        rows = largest_fitting(
            lambda m: micro_tokens(MicroShape.worst(m, k, lp, r), st)[0], mb_rows, int(budget)
        )
        micro = max(1, rows) if micro is None else min(int(micro), max(1, rows))
    roll = _get(cfg, "rollout.max_rows_per_batch")
    kv_budget = _get(cfg, "rollout.max_kv_tokens")
    if kv_budget is not None:
        g = recipe.prompts // st.devices
        all_rows = max(1, g * (k + recipe.anchors))

        def slots(x: int) -> int:
            return kv_slots(x, subbatch_prompts(x, g, k, g * recipe.anchors), lp, r, st)

        rows = max(1, largest_fitting(slots, all_rows, int(kv_budget)))
        roll = rows if roll is None else min(int(roll), rows)
    return recipe, st, (int(micro) if micro else None), (int(roll) if roll else None)


def config_contrastive(cfg, world: int = 1) -> tuple[Setting, int, int] | None:
    """(setting, texts per GPU, longest text in tokens) of a composed contrastive baseline
    config (method=infonce|simcse) on ``world`` GPUs; None for a GRACE run. InfoNCE embeds a
    query, its positive and one hard negative per triplet, SimCSE each sentence twice; a text is
    cut to model.max_text_tokens inside the chat template (`contrastive.training_prompter`)."""
    objective = str(_get(cfg, "model.objective", ""))
    if objective not in TEXTS_PER_ITEM:
        return None
    st = config_setting(cfg, world)
    per_gpu = max(1, int(_get(cfg, "data.prompts_per_step", Recipe.prompts)) // st.devices)
    texts = per_gpu * TEXTS_PER_ITEM[objective]
    longest = int(_get(cfg, "prompt.max_prompt_tokens", Recipe.prompt_len))
    cut = _get(cfg, "model.max_text_tokens")
    if cut:
        longest = min(longest, int(cut) + TEMPLATE_TOKENS)
    return st, texts, longest


def predict_config_peak(cfg, world: int = 1) -> float | None:
    """Peak bytes per GPU of a composed run config on ``world`` GPUs by this model, or None where
    it does not apply (a backbone without a known shape, or a precision other than bf16-mixed:
    the model is fitted to bf16 autocast with fp32 master weights). A contrastive baseline's
    config is predicted by `predict_contrastive_peak`, a GRACE run's by `predict_peak`."""
    if "bf16" not in str(_get(cfg, "trainer.precision", "")):
        return None
    s = config_shape(cfg)
    if s is None:
        return None
    contrastive = config_contrastive(cfg, world)
    if contrastive is not None:
        st, texts, text_len = contrastive
        return predict_contrastive_peak(s, st, texts, text_len)["peak"]
    recipe, st, micro, roll = config_recipe(cfg, world)
    return predict_peak(s, st, recipe, micro_rows=micro, rollout_rows=roll)["peak"]


# ------------------------------------------------------------------------ stored results
# bench layer_saved_bytes() (torch 2.13, transformers 5.24)
LAYER_SAVED_DEFAULT: dict[str, LayerSaved] = {  # bytes: full per token, weights; LoRA same
    "qwen": LayerSaved(119864, 93597696, 158996, 88471552),
    "qwen3b": LayerSaved(151624, 154157056, 199972, 145129472),
    "llama": LayerSaved(162920, 201351168, 202052, 171323392),
    "qwen3": LayerSaved(196904, 201872384, 240132, 171994112),
}
# bench/paper_scale.py's fit of 2026-12-06 (docs/scale.md): --predict-only, --gpu, startup check
DEFAULT_COEFFS = Coeffs(
    kappa_full=1,
    kappa_lora=1.419,
    grad_extra=4.495,
    lm=7.891,
    lm_bwd=9.583,
    sample=15.98,
    prefill=0.3094,
    update_const=0.375 * GIB,
    rollout_const=0.0213 * GIB,
)
