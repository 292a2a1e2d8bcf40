"""Peak memory of one ``paper_sup`` step at paper scale: CPU measurements -> memory model -> table.

    python bench/paper_scale.py                 # measure on CPU, fit, print the 80 GB table (~10 min)
    python bench/paper_scale.py --predict-only  # the table from the stored coefficients (seconds)
    python bench/paper_scale.py --gpu           # full-size Qwen2.5-1.5B shape, one rollout batch
    python bench/paper_scale.py --gpu --device cpu --tiny   # smoke test of the --gpu code path

Device command (one H100 80 GB; the bench prints its own prediction next to what it measures):

    python bench/paper_scale.py --gpu --prompts 64 --response-len 2048 --prompt-len 1024

What it does (not a test; run it by hand):

1. **Measure** (CPU). Each point is ONE ``paper_sup``-shaped rollout batch (rollout -> reward ->
   update, through ``train.py``'s ``train()``, ``trainer.precision=bf16-mixed`` on CPU) on a
   random-init model of a REAL backbone shape built from its config (vocabulary, width, heads,
   KV heads, MLP width, tied embeddings) at reduced depth and length, EOS off
   (``rollout.ignore_eos``), synthetic prompts of an exact token length. Every point runs in its
   own subprocess. Memory is the RSS high-water mark (``/proc/self/status`` VmHWM), reset per
   phase through ``/proc/self/clear_refs`` and read relative to the RSS when the phase starts;
   glibc's mmap threshold is set to 64 KiB so freed tensors leave RSS at once (RSS follows live
   tensors). Phases: rollout (``GraceModule.rollout``), update without the optimiser step, and the
   optimiser step (``torch.optim.AdamW.step``).
2. **Per-layer activations at full width** (in-process, seconds): one real-width decoder layer of
   each backbone, forward under bf16 autocast, bytes of the tensors autograd saves for backward
   (``torch.autograd.graph.saved_tensors_hooks``, storages counted once) at two token counts:
   saved = weight copies + bytes_per_token x tokens, for full fine-tuning and for LoRA.
3. **Fit** the memory model (below) to the CPU points; report the error on held-out points.
4. **Predict** the peak of the full recipe on one 80 GB GPU for the four paper backbones, full
   fine-tuning vs LoRA, with and without gradient checkpointing, one GPU vs FSDP over 4 GPUs.

The memory model (bytes per GPU) lives in ``grace_lightning/scale.py`` (its docstring has the
formulas), so this bench and the startup memory check (``grace_lightning/presets.py``) use the
same accounting: bf16 K and V, the padded rectangle the loss pass runs (``rl/update.py``
``padded_tokens``, what ``algo.max_tokens_per_micro_batch`` counts). This script measures and
fits it; the fitted coefficients are stored there (``DEFAULT_COEFFS``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grace_lightning.scale import (  # noqa: E402  (the model this bench measures and fits)
    DEFAULT_COEFFS,
    GIB,
    LAYER_SAVED_DEFAULT,
    SHAPES,
    TINY,
    Coeffs,
    LayerSaved,
    MicroShape,
    Recipe,
    Setting,
    Shape,
    forward_parts,
    kv_slots,
    largest_fitting,
    lm_chunk_tokens,
    micro_tokens,
    predict_peak,
    prefill_per_token,
    rollout_parts,
    static_parts,
    step_parts,
    subbatch_prompts,
    update_parts,
)

__all__ = [  # re-exported: tests and scripts read the model through this module too
    "DEFAULT_COEFFS",
    "LAYER_SAVED_DEFAULT",
    "SHAPES",
    "TINY",
    "Coeffs",
    "LayerSaved",
    "MicroShape",
    "Recipe",
    "Setting",
    "Shape",
    "forward_parts",
    "kv_slots",
    "largest_fitting",
    "lm_chunk_tokens",
    "micro_tokens",
    "predict_peak",
    "prefill_per_token",
    "rollout_parts",
    "static_parts",
    "step_parts",
    "subbatch_prompts",
    "update_parts",
]

# glibc: tensors over 64 KiB get their own mmap, so freed memory leaves RSS at once
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", **os.environ}


def build_model(shape: Shape, layers: int | None = None, seed: int = 0):
    """A random-init causal LM of ``shape`` (fp32), ``layers`` decoder layers (default: all)."""
    import torch
    import transformers

    n = shape.layers if layers is None else layers
    common = dict(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=n,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate,
        tie_word_embeddings=shape.tied,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        use_cache=True,
    )
    if shape.arch == "qwen2":
        config = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    elif shape.arch == "qwen3":
        config = transformers.Qwen3Config(head_dim=shape.head_dim, **common)
        cls = transformers.Qwen3ForCausalLM
    else:
        config = transformers.LlamaConfig(head_dim=shape.head_dim, **common)
        cls = transformers.LlamaForCausalLM
    config._attn_implementation = "sdpa"
    from transformers.initialization import no_init_weights

    with no_init_weights():  # HF's normal_ init takes ~10 s per 200M params on a loaded CPU
        model = cls(config).float()
    model.tie_weights()
    gen = torch.Generator().manual_seed(seed)
    bound = 0.02 * math.sqrt(3)  # uniform with HF's initializer_range std 0.02
    # one random block of 2**20 + 7 values tiled over every matrix (drawing 200M randoms takes
    # seconds on a loaded CPU; the bench needs touched, finite weights, not good ones)
    block = torch.empty(2**20 + 7).uniform_(-bound, bound, generator=gen)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                _tile(param.view(-1), block)
            elif "norm" in name:
                param.fill_(1.0)
            else:  # biases
                param.zero_()
    return model


def _tile(flat, block) -> None:
    """Fill a flat tensor with copies of ``block`` (memcpy speed)."""
    m = block.numel()
    whole = flat.numel() // m
    if whole:
        flat[: whole * m].view(whole, m).copy_(block.expand(whole, m))
    rest = flat.numel() - whole * m
    if rest:
        flat[whole * m :].copy_(block[:rest])


# ------------------------------------------------------------------------- measurement (child)
def rss_kb(field: str = "VmRSS") -> int:
    """VmRSS / VmHWM of this process in KiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def timed_methods(cls, names: tuple[str, ...]) -> dict[str, list[float]]:
    """Wrap each ``cls.<name>`` to record its wall time per call: name -> seconds, one per call."""
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        fn = getattr(cls, name)

        def timed(*a, _fn=fn, _name=name, **kw):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                times[_name].append(time.perf_counter() - t0)

        setattr(cls, name, timed)
    return times


class PhasePeaks:
    """RSS high-water mark per phase, relative to the RSS when the phase starts (bytes).

    Phases nest; entering one folds the current high-water mark into every open phase before
    resetting it (``/proc/self/clear_refs``), so no phase loses its peak. A phase opened with
    ``exclude=True`` (the optimiser step) is NOT folded into the phases around it: "update" is
    the update without its optimiser steps, which are measured as their own phase.
    """

    def __init__(self, cuda: bool = False):
        self.cuda = cuda  # also torch.cuda.max_memory_allocated per phase (absolute bytes)
        self.cuda_peak: dict[str, int] = {}
        self.cuda_running: dict[int, int] = {}
        self.open: list[tuple[str, int, bool]] = []  # (name, rss at start, excluded)
        self.running: dict[int, int] = {}  # id in self.open -> running max HWM
        self.peak: dict[str, int] = {}  # name -> max over calls of (HWM - start RSS)
        self.calls: dict[str, int] = {}
        self.absolute: dict[str, int] = {}  # name -> max HWM (bytes, not relative)

    @staticmethod
    def _reset() -> None:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS

    def _fold(self) -> None:
        hwm = rss_kb("VmHWM")
        for i, _ in enumerate(self.open):
            self.running[i] = max(self.running.get(i, 0), hwm)
        if self.cuda:
            import torch

            top = torch.cuda.max_memory_allocated()
            for i, _ in enumerate(self.open):
                self.cuda_running[i] = max(self.cuda_running.get(i, 0), top)

    def _reset_cuda(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()

    def enter(self, name: str, exclude: bool = False) -> None:
        self._fold()
        self.open.append((name, rss_kb(), exclude))
        self.running[len(self.open) - 1] = rss_kb()
        self._reset()
        self._reset_cuda()

    def exit(self) -> None:
        i = len(self.open) - 1
        name, start, exclude = self.open[i]
        hwm = max(self.running.pop(i), rss_kb("VmHWM"))
        if self.cuda:
            import torch

            top = max(self.cuda_running.pop(i, 0), torch.cuda.max_memory_allocated())
            self.cuda_peak[name] = max(self.cuda_peak.get(name, 0), top)
        self.open.pop()
        self.peak[name] = max(self.peak.get(name, 0), (hwm - start) * 1024)
        self.absolute[name] = max(self.absolute.get(name, 0), hwm * 1024)
        self.calls[name] = self.calls.get(name, 0) + 1
        if exclude:  # the enclosing phases never see this one's peak
            self._reset()
            self._reset_cuda()
        else:
            self._fold()

    def wrap(self, fn, name: str, exclude: bool = False):
        def wrapped(*args, **kwargs):
            self.enter(name, exclude)
            try:
                return fn(*args, **kwargs)
            finally:
                self.exit()

        wrapped.__wrapped__ = fn
        return wrapped


def synthetic_triplets(tokenizer, prompter, n: int, prompt_len: int) -> list[dict]:
    """``n`` triplets whose chat-templated prompts are exactly ``prompt_len`` tokens long."""
    word = tokenizer(" the", add_special_tokens=False)["input_ids"]
    frame = prompter.lengths([""])[0]
    target = prompt_len - frame
    if target < 1:
        raise SystemExit(f"--prompt-len {prompt_len}: the chat template alone is {frame} tokens")
    count = target
    for _ in range(5):  # BPE may merge at the edges: adjust to the exact length
        text = "the" + tokenizer.decode(word * (count - 1))
        got = prompter.lengths([text])[0]
        if got == prompt_len:
            break
        count += prompt_len - got
    else:
        raise RuntimeError(f"could not build a {prompt_len}-token prompt (got {got})")
    return [{"query": text, "positive": text, "negative": text} for _ in range(n)]


def config_has(cfg, key: str) -> bool:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key, default="__absent__") != "__absent__"


# knobs the update/rollout code may or may not have yet: point field -> config key
OPTIONAL_KNOBS = {
    "micro_rows": "algo.micro_batch_size",
    "micro_tokens": "algo.max_tokens_per_micro_batch",
    "roll_rows": "rollout.max_rows_per_batch",
    "roll_kv": "rollout.max_kv_tokens",
}


@dataclass
class Point:
    """One measured configuration (per device)."""

    shape: str = "qwen"
    layers: int = 1
    groups: int = 2  # policy prompts per rollout batch (data.prompts_per_step)
    k: int = 4  # rollouts per prompt
    minibatch: int = 0  # groups per optimiser step (0 = all: one step)
    prompt_len: int = 96
    response_len: int = 32
    lora: bool = False
    gc: bool = False
    micro_rows: int | None = None
    micro_tokens: int | None = None
    roll_rows: int | None = None
    roll_kv: int | None = None
    device: str = "cpu"
    tiny: bool = False
    # EOS on: this fraction of the vocabulary ends a response (a random-init model never
    # samples the one real EOS), so rows stop at mixed lengths; 0 = EOS off (rollout.ignore_eos)
    eos_frac: float = 0.0
    label: str = ""

    @property
    def mb_groups(self) -> int:
        return self.minibatch or self.groups


def compose(p: Point, data_path: str, out_dir: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    gpu = p.device != "cpu"
    overrides = [
        "experiment=none",  # the group defaults, not the quickstart preset
        "backbone=tiny",  # replaced by the shaped model (see run_point); its tokenizer is used
        "reward=sup",
        "data=paper",  # jsonl triplets: the synthetic file written by run_point
        f"data.root={Path(data_path).parent}",
        f"data.sup.path={Path(data_path).name}",
        "data.val_fraction=0",
        f"data.prompts_per_step={p.groups}",
        f"algo.prompts_per_minibatch={p.mb_groups}",
        "algo.beta=0.0",
        f"rollout.num_generations={p.k}",
        f"rollout.max_new_tokens={p.response_len}",
        "rollout.temperature=1.0",
        "rollout.anchor_temperature=0.5",
        # EOS off: fixed shapes; on (eos_frac > 0): mixed response lengths
        f"rollout.ignore_eos={'false' if p.eos_frac > 0 else 'true'}",
        f"prompt.max_prompt_tokens={p.prompt_len}",
        f"trainer={'gpu' if gpu else 'cpu'}",
        "trainer.precision=bf16-mixed",  # the paper recipe: bf16 autocast, fp32 master weights
        f"trainer.max_steps={p.groups // p.mb_groups}",  # exactly one rollout batch
        "trainer.enable_progress_bar=false",
        "logger=none",
        "callbacks=none",
        "model.logging_cfg.table_every_n_steps=0",
        f"model.gradient_checkpointing={str(p.gc).lower()}",
        f"paths.output_dir={out_dir}",
    ]
    if p.lora:
        overrides.append("peft=lora")
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    skipped = []
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = out_dir
        if config_has(cfg, "algo.log_term_grad_norms_steps"):  # the steady-state update: no
            cfg.algo.log_term_grad_norms_steps = 0  # per-term gradient copies (first steps only)
        for fld, key in OPTIONAL_KNOBS.items():
            value = getattr(p, fld)
            if value is None:
                continue
            if config_has(cfg, key):
                section, name = key.split(".")
                cfg[section][name] = value
            else:
                skipped.append(key)
    HydraConfig().set_config(cfg)
    return cfg, skipped


def run_point(p: Point) -> dict:
    """One rollout batch of ``p`` in this process; peaks per phase (bytes) and timings."""
    import torch

    if p.device == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    import grace_lightning.models.backbone as backbone_mod
    import grace_lightning.module as module_mod
    from grace_lightning.models.backbone import BackboneConfig, load_tokenizer
    from grace_lightning.prompts import ChatPrompter
    from grace_lightning.train import train

    cuda = torch.cuda.is_available() and p.device != "cpu"
    peaks = PhasePeaks(cuda=cuda)
    shape = TINY if p.tiny else SHAPES[p.shape]
    result: dict = {"point": asdict(p)}
    base = rss_kb()

    def shaped_backbone(cfg, device=None):  # GraceModule's loader -> the shaped random model
        tok = load_tokenizer(BackboneConfig())
        model = build_model(shape, p.layers)
        eos = [tok.eos_token_id]
        if p.eos_frac > 0:  # every (1 / eos_frac)-th token id ends a response too
            eos += list(range(3, shape.vocab, max(1, round(1 / p.eos_frac))))
        model.generation_config.eos_token_id = eos
        model.generation_config.pad_token_id = tok.pad_token_id
        result["static_bytes"] = (rss_kb() - base) * 1024
        return model, tok

    module_mod.load_backbone = shaped_backbone
    backbone_mod.load_backbone = shaped_backbone
    cls = module_mod.GraceModule
    cls.rollout = peaks.wrap(cls.rollout, "rollout")
    cls.update = peaks.wrap(cls.update, "update")
    cls.manual_backward = peaks.wrap(cls.manual_backward, "backward")
    try:  # the loss pass's forward (rl/update.py calls rl/policy.py's response_logprobs)
        import grace_lightning.rl.update as update_mod

        update_mod.response_logprobs = peaks.wrap(update_mod.response_logprobs, "loss_forward")
    except (ImportError, AttributeError):
        pass
    torch.optim.AdamW.step = peaks.wrap(torch.optim.AdamW.step, "optim_step", exclude=True)
    observe_shapes(result)
    times = timed_methods(cls, ("rollout", "update", "training_step"))

    # the run's checkpoints are GBs at these shapes: the directory goes when the run ends
    with tempfile.TemporaryDirectory(prefix="bench-paper-scale-", ignore_cleanup_errors=True) as d:
        tmp = Path(d)
        tok = load_tokenizer(BackboneConfig())
        prompter = ChatPrompter(tok, None, p.prompt_len)  # system prompt set below, same template
        cfg, skipped = compose(p, str(tmp / "triplets.jsonl"), str(tmp / "run"))
        prompter = ChatPrompter(tok, cfg.prompt.system_prompt, p.prompt_len)
        rows = synthetic_triplets(tok, prompter, p.groups, p.prompt_len)
        (tmp / "triplets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        train(cfg)
        result["wall_s"] = time.perf_counter() - t0
    total = {name: sum(t) if t else None for name, t in times.items()}
    result["rollout_s"] = total["rollout"]
    result["update_s"] = total["update"]
    result["step_s"] = total["training_step"]
    result["peaks"] = peaks.peak
    result["peaks_above_base"] = {k: v - base * 1024 for k, v in peaks.absolute.items()}
    result["process_peak_bytes"] = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    ) * 1024
    result["skipped_knobs"] = skipped
    if cuda:
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
        result["cuda_phase_bytes"] = peaks.cuda_peak
    return result


def observe_shapes(result: dict) -> None:
    """Record what ran, for the model's prediction of EOS-on points: per rollout sub-batch
    (rows, prompts, longest prompt, the largest active rows x key length of a decode step) and
    per loss-pass micro-batch its `MicroShape` (rows, prompts, longest prompt and response)."""
    from grace_lightning.rl import update as update_mod
    from grace_lightning.rollout import engine as engine_mod

    rollout, micro = result.setdefault("rollout_shapes", []), result.setdefault("micro_shapes", [])
    generate = engine_mod.HFRolloutEngine.generate

    def observed_generate(self, prompt_ids, *args, **kwargs):
        out = generate(self, prompt_ids, *args, **kwargs)
        lengths = out.lengths.tolist()
        row = 0
        for pieces in self.last_plan:
            n = sum(k for _, _, k in pieces)
            lens = sorted(lengths[row : row + n], reverse=True)
            row += n
            lp = max(len(prompt_ids[q]) for q, _, _ in pieces)
            # decode step t runs the rows with length > t against lp + t + 1 keys
            transient = max(((i + 1) * (lp + t) for i, t in enumerate(lens)), default=0)
            rollout.append([n, len({q for q, _, _ in pieces}), lp, transient])
        return out

    engine_mod.HFRolloutEngine.generate = observed_generate
    plan = update_mod.PolicyUpdater.plan

    def observed_plan(self, groups, costs):
        out = plan(self, groups, costs)
        for rows in out:
            sel = costs[rows]  # (n, 3) prompt tokens, response tokens, prompt index
            n, prompts = len(rows), len(set(sel[:, 2].tolist()))
            micro.append([n, prompts, int(sel[:, 0].max()), int(sel[:, 1].max())])
        return out

    update_mod.PolicyUpdater.plan = observed_plan


# --------------------------------------------------------------------------- measurement grid
def default_grid() -> list[Point]:
    """The CPU points, one knob at a time. "base" is quick; "mid" (2 prompts x 8 rollouts x 64
    tokens) and "big" (4 x 8 x 64) have enough tokens for the activations and LM-head chunks to
    show in the loss forward next to the 151,936 x 1536 embedding's gradients. Fitted on EOS-off
    points (fixed shapes); held out on EOS-on points (mixed response lengths)."""
    base = Point(shape="qwen", layers=1, groups=2, k=4, prompt_len=96, response_len=32)
    mid = replace(base, k=8, response_len=64)
    big = replace(mid, groups=4)
    fit = [
        replace(base, label="base"),
        replace(big, label="big: 4 x 8 rollouts x 64"),
        replace(base, layers=2, label="layers 2"),
        replace(base, response_len=64, label="response 64"),
        replace(mid, lora=True, label="mid, LoRA"),
        replace(mid, lora=True, layers=2, label="mid, LoRA, layers 2"),
        replace(mid, lora=True, gc=True, label="mid, LoRA, grad ckpt"),
        replace(mid, gc=True, label="mid, grad ckpt"),
        replace(mid, micro_rows=4, label="mid, micro-batch 4 rows"),
        replace(base, roll_rows=4, label="rollout budget 4 rows"),
    ]
    # held out: EOS on (2% of the vocabulary ends a row: responses of mixed lengths), so the
    # micro-batches' padded rectangles and the rollout's shrinking batches are the observed ones;
    # the token budgets are packed by the planner's padded count (rl/update.py padded_tokens)
    eos = 0.02
    held_out = [
        replace(mid, layers=2, micro_rows=8, eos_frac=eos, label="mid, layers 2, micro 8, EOS"),
        replace(base, shape="llama", lora=True, eos_frac=eos, label="LoRA, Llama shape, EOS"),
        replace(big, micro_tokens=400, eos_frac=eos, label="big, 400-token budget, EOS"),
        replace(mid, gc=True, micro_tokens=640, eos_frac=eos, label="mid, GC, 640 tokens, EOS"),
    ]
    return [replace(p, label="fit: " + p.label) for p in fit] + [
        replace(p, label="held out: " + p.label) for p in held_out
    ]


def point_key(p: Point) -> str:
    d = asdict(p)
    d.pop("label")
    return json.dumps(d, sort_keys=True)


def missing_knobs() -> set[str]:
    """OPTIONAL_KNOBS keys the default training config does not have (yet)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=["experiment=none", "reward=sup"])
    return {key for key in OPTIONAL_KNOBS.values() if not config_has(cfg, key)}


def measure(points: list[Point], cache_file: Path | None, log=print) -> list[dict]:
    """Run each point in its own subprocess (results cached in ``cache_file`` by point).
    A point that sets a knob the config does not have is skipped (it would repeat another)."""
    cached: dict[str, dict] = {}
    if cache_file and cache_file.exists():
        for line in cache_file.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                cached[point_key(Point(**r["point"]))] = r
    out, missing = [], missing_knobs()
    for p in points:
        absent = [
            k for f, k in OPTIONAL_KNOBS.items() if getattr(p, f) is not None and k in missing
        ]
        if absent:
            log(f"  {p.label}: skipped ({', '.join(absent)} not in the config yet)")
            continue
        key = point_key(p)
        if key in cached:
            r = dict(cached[key], point=asdict(p))
            out.append(r)
            continue
        t0 = time.perf_counter()
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--point", json.dumps(asdict(p))]
        # the child's temp files (its run dir: GBs of checkpoints) go to a dir this process
        # removes, so that a child killed by the OOM killer leaves nothing behind either
        with tempfile.TemporaryDirectory(prefix="bench-paper-scale-point-") as scratch:
            env = {**CHILD_ENV, "TMPDIR": scratch}
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            err = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            log(f"  {p.label}: FAILED ({' | '.join(err)[:300]})")
            continue
        r = json.loads(line[-1][len("RESULT ") :])
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        r["cpu_s"] = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
        log(f"  {p.label}: {time.perf_counter() - t0:.0f} s wall, {r['cpu_s']:.0f} s CPU")
        out.append(r)
        if cache_file:
            with cache_file.open("a") as f:
                f.write(json.dumps(r) + "\n")
    return out


# --------------------------------------------------------------- per-layer saved activations
def layer_saved_bytes(
    shape: Shape, lora: bool, tokens: tuple[int, int] = (128, 256), lora_r: int = 16
) -> dict[str, float]:
    """Bytes autograd saves for backward in ONE real-width decoder layer under bf16 autocast.

    Measured with ``saved_tensors_hooks`` (each storage counted once, by address) around the
    layer's forward at two token counts (one row): saved = weights + per_token x tokens.
    ``weights``: the bf16 casts of the layer's weights, kept for backward (the input gradient
    needs them), once per forward pass (autocast without its weight cache, as Lightning runs it).
    Returns {"per_token": bytes, "weights": bytes}.
    """
    import torch

    from grace_lightning.models.lora import wrap_lora

    torch.manual_seed(0)
    model = build_model(replace(shape, vocab=256), layers=1)
    if lora:
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = wrap_lora(
            model, {"r": lora_r, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": targets}
        )
    model.train()
    layer = model.get_decoder().layers[0]
    seen: dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. sparse or wrapper tensors
            pass
        return t

    forward = layer.forward

    def hooked(*args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return forward(*args, **kwargs)

    layer.forward = hooked
    sizes = []
    for n in tokens:
        seen.clear()
        ids = torch.randint(0, 256, (1, n))
        # as Lightning's bf16-mixed: cache_enabled=False, every use casts its weight again
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            out = model(input_ids=ids, use_cache=False).logits
        sizes.append(sum(seen.values()))
        del out
    per_token = (sizes[1] - sizes[0]) / (tokens[1] - tokens[0])
    return {"per_token": per_token, "weights": sizes[0] - per_token * tokens[0]}


# ------------------------------------------------------------------------------------ fitting
def point_shape(p: Point) -> Shape:
    return TINY if p.tiny else SHAPES[p.shape]


def trainable_params(s: Shape, layers: int, lora: bool, r: int = 16) -> int:
    return s.lora_params(r, layers) if lora else s.params(layers)


def predict_measured(
    p: Point, c: Coeffs, lay: LayerSaved, skipped=(), observed: dict | None = None
) -> dict[str, float]:
    """What ``run_point`` measures for ``p`` (the FIRST rollout batch on CPU), per phase, bytes
    above the RSS at the phase's start: no gradients or AdamW state exist before the first step,
    (Lightning's autocast runs with cache_enabled=False: no bf16 weight cache persists).

    observed: the point's result with the shapes that ran (``observe_shapes``): with EOS on,
    rows end early, so the micro-batches' padded rectangles and the rollout's per-step keys are
    the observed ones; without it every response runs ``response_len`` tokens."""
    s, st, n = point_shape(p), Setting(lora=p.lora, gc=p.gc), p.layers
    observed = observed or {}
    vocab_chunk = lm_chunk_tokens(s.vocab)
    if observed.get("rollout_shapes"):
        subs = [
            rollout_parts(s, n, st, rows, prompts, lp, p.response_len, c, lay, transient)
            for rows, prompts, lp, transient in observed["rollout_shapes"]
        ]
    else:
        all_rows = p.groups * (p.k + 2)
        roll = None if OPTIONAL_KNOBS["roll_rows"] in skipped else p.roll_rows
        r = min(roll or all_rows, all_rows)
        prompts = subbatch_prompts(r, p.groups, p.k, 2 * p.groups)
        subs = [rollout_parts(s, n, st, r, prompts, p.prompt_len, p.response_len, c, lay)]
    mb_rows = p.mb_groups * p.k
    if observed.get("micro_shapes"):
        micros = [MicroShape(*m) for m in observed["micro_shapes"]]
    else:
        micro = None if OPTIONAL_KNOBS["micro_rows"] in skipped else p.micro_rows
        m = min(micro or mb_rows, mb_rows)
        micros = [MicroShape.worst(m, p.k, p.prompt_len, p.response_len)]
    ups = [
        update_parts(s, n, st, m, c, lay, vocab_chunk, accumulating=m.rows < mb_rows)
        for m in micros
    ]
    forward = max(sum(forward_parts(s, n, st, m, c, lay, vocab_chunk).values()) for m in micros)
    t = trainable_params(s, n, p.lora)
    update = max(sum(up.values()) for up in ups)
    if p.groups > p.mb_groups:  # later mini-batches find the AdamW state of the first step
        update += 8 * t
    biggest = 16 * max(s.intermediate, s.q_dim, s.hidden) if p.lora else s.embed_params()
    # CPU AdamW (single-tensor): state created at the first step + sqrt(v) and its scaled copy
    step = 8 * t + 2 * 4 * biggest
    return {
        "rollout": max(sum(ro.values()) for ro in subs),
        "update": update,
        "optim_step": step,
        "loss_forward": forward,
    }


FIT_PHASES = ("rollout", "update", "loss_forward")  # measured phases the model is fitted to
REPORT_PHASES = ("rollout", "loss_forward", "update", "optim_step")
FIT_PARAMS = [  # (name, prior, low, high): a weak pull towards the prior keeps it well posed
    # >= 1: what autograd saves (step 2) is resident until the backward uses it
    ("kappa_full", 1.0, 1.0, 4.0),
    ("kappa_lora", 1.0, 1.0, 4.0),
    ("lm", 20.0, 0.0, 200.0),
    ("lm_bwd", 30.0, 0.0, 200.0),
    ("sample", 30.0, 0.0, 400.0),
    ("prefill", 1.0, 0.0, 10.0),
    ("grad_extra", 4.0, 0.0, 12.0),
    ("update_const", 0.0, -0.5 * GIB, 1.0 * GIB),
    ("rollout_const", 0.0, -0.5 * GIB, 1.0 * GIB),
]


def fit_coeffs(results: list[dict], lays: dict[str, LayerSaved], prior: Coeffs | None = None):
    """Least squares (GiB residuals) of the rollout and update phases over ``results``."""
    import numpy as np

    prior = prior or Coeffs()
    names = [n for n, *_ in FIT_PARAMS]
    scale = np.array([max(abs(getattr(prior, n)), 1.0) if "const" not in n else GIB for n in names])
    x0 = np.array([getattr(prior, n) for n in names]) / scale
    lo = np.array([f[2] for f in FIT_PARAMS]) / scale
    hi = np.array([f[3] for f in FIT_PARAMS]) / scale
    x0 = np.clip(x0, lo, hi)

    def coeffs(x) -> Coeffs:
        return replace(prior, **{n: float(v) for n, v in zip(names, x * scale)})

    def residuals(x):
        c, res = coeffs(x), []
        for r in results:
            p = Point(**r["point"])
            pred = predict_measured(
                p, c, lays[p.shape if not p.tiny else "tiny"], r.get("skipped_knobs", ()), r
            )
            for phase in FIT_PHASES:
                if phase in r["peaks"]:
                    res.append((pred[phase] - r["peaks"][phase]) / GIB)
        res.extend(0.002 * (x - x0))  # weak prior (2 MB of residual per prior unit)
        return np.array(res)

    return coeffs(bounded_least_squares(residuals, x0, lo, hi))


def bounded_least_squares(residuals, x0, lo, hi, iterations: int = 50):
    """min ||residuals(x)||^2 for lo <= x <= hi: Gauss-Newton with a numeric Jacobian, steps
    projected onto the bounds (the model is piecewise linear in x, so a few steps converge)."""
    import numpy as np

    x = np.clip(np.asarray(x0, dtype=float), lo, hi)
    for _ in range(iterations):
        r = residuals(x)
        eps = 1e-4
        jac = np.stack([(residuals(x + eps * e) - r) / eps for e in np.eye(len(x))], axis=1)
        free = ~(((x <= lo) & (jac.T @ r > 0)) | ((x >= hi) & (jac.T @ r < 0)))  # active set
        step = np.zeros_like(x)
        step[free] = np.linalg.lstsq(jac[:, free], -r, rcond=None)[0]
        new = np.clip(x + step, lo, hi)
        for _ in range(20):  # halve the step until the cost does not grow
            if np.sum(residuals(new) ** 2) <= np.sum(r**2) + 1e-12:
                break
            step /= 2
            new = np.clip(x + step, lo, hi)
        if np.allclose(new, x, rtol=0, atol=1e-9):
            return new
        x = new
    return x


def fit_report(results: list[dict], c: Coeffs, lays: dict[str, LayerSaved]) -> list[dict]:
    rows = []
    for r in results:
        p = Point(**r["point"])
        pred = predict_measured(
            p, c, lays[p.shape if not p.tiny else "tiny"], r.get("skipped_knobs", ()), r
        )
        row = {"label": p.label, "held_out": not p.label.startswith("fit:")}
        for phase in REPORT_PHASES:
            row[phase] = (r["peaks"].get(phase), pred[phase])
        row["skipped"] = r.get("skipped_knobs", [])
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- paper-scale table
SETTINGS = [
    Setting(lora=lora, gc=gc, devices=n)
    for lora in (False, True)
    for n in (1, 4)
    for gc in (False, True)
]


def gib(x: float | None) -> str:
    return "-" if x is None else f"{x / GIB:.1f}"


def paper_table(c: Coeffs, lays: dict[str, LayerSaved], recipe: Recipe, cap: float) -> list[dict]:
    """Per backbone x setting: peak as written (no budgets), the largest micro-batch and rollout
    batch that fit ``cap`` bytes, and the peak with those."""
    rows = []
    for key, s in SHAPES.items():
        lay = lays[key]
        for st in SETTINGS:
            asis = predict_peak(s, st, recipe, c, lay)
            mb_rows, all_rows = asis["micro_rows"], asis["rollout_rows"]

            def upd(m, st=st, s=s, lay=lay):
                return predict_peak(s, st, recipe, c, lay, micro_rows=m)["phases"]["update"]

            def rol(r, st=st, s=s, lay=lay):
                return predict_peak(s, st, recipe, c, lay, rollout_rows=r)["phases"]["rollout"]

            m = largest_fitting(upd, mb_rows, cap)
            r = largest_fitting(rol, all_rows, cap)
            best = predict_peak(s, st, recipe, c, lay, micro_rows=max(m, 1), rollout_rows=max(r, 1))
            fits = m >= 1 and r >= 1 and best["peak"] <= cap
            rows.append(
                {
                    "backbone": s.name,
                    "key": key,
                    "setting": st.name(),
                    "asis": asis,
                    "micro": m,
                    "rollout": r,
                    "best": best,
                    "fits": fits,
                    "mb_rows": mb_rows,
                    "all_rows": all_rows,
                }
            )
    return rows


def print_paper_table(rows: list[dict], recipe: Recipe, cap: float) -> None:
    print(
        f"\npaper_sup per GPU: {recipe.prompts} prompts x {recipe.k} rollouts + {recipe.anchors} "
        f"anchors each, prompts {recipe.prompt_len} + responses {recipe.response_len} tokens "
        f"(EOS off), mini-batch {recipe.minibatch} groups; bf16 autocast, fp32 master weights, "
        f"AdamW; 'fits' = predicted peak <= {cap / GIB:.0f} GiB"
    )
    head = (
        f"{'backbone':13s} {'setting':24s} {'as written':>10s} {'(phase)':>10s} "
        f"{'micro rows':>10s} {'(tokens)':>9s} {'rollout rows':>12s} {'(KV tok)':>9s} "
        f"{'peak':>6s} {'(phase)':>10s} fits"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        a, b = r["asis"], r["best"]
        micro = f"{r['micro']}/{r['mb_rows']}"
        roll = f"{r['rollout']}/{r['all_rows']}"
        print(
            f"{r['backbone']:13s} {r['setting']:24s} {gib(a['peak']):>10s} {a['phase']:>10s} "
            f"{micro:>10s} {b['micro_tokens'] if r['micro'] else 0:>9d} {roll:>12s} "
            f"{b['kv_slots']:>9d} "
            f"{gib(b['peak']):>6s} {b['phase']:>10s} {'yes' if r['fits'] else 'NO'}"
        )
    print(
        "as written: one micro-batch per mini-batch and the whole rollout batch at once. micro rows"
        " / rollout rows: the largest algo.micro_batch_size and rollout row budget that fit (of"
        " the mini-batch / rollout batch per GPU); tokens = the padded rectangle the loss pass"
        " runs (groups x prompt + rows x response on the shared-prompt pass, rows x (prompt +"
        " response) with GC): the algo.max_tokens_per_micro_batch that gives those rows; KV tok ="
        " rollout.max_kv_tokens that gives those rows; peak: with both. K and V cached in bf16."
        " GiB = 2**30 bytes."
    )


def print_fit_report(rows: list[dict]) -> dict[str, float]:
    """Measured vs model per point and phase (GiB); relative errors over the fitted phases."""
    print(
        f"\n{'point':40s}" + "".join(f"{p:>16s}" for p in REPORT_PHASES) + "  (measured/model GiB)"
    )
    errs: dict[str, list[float]] = {"fit": [], "held_out": []}
    for r in rows:
        cells = []
        for phase in REPORT_PHASES:
            meas, pred = r[phase]
            cells.append("-" if meas is None else f"{meas / GIB:.2f}/{pred / GIB:.2f}")
            if meas and phase in FIT_PHASES:
                errs["held_out" if r["held_out"] else "fit"].append(abs(pred - meas) / meas)
        note = f"  (knob absent: {', '.join(r['skipped'])})" if r["skipped"] else ""
        print(f"{r['label'][:40]:40s}" + "".join(f"{x:>16s}" for x in cells) + note)
    out = {}
    for k, v in errs.items():
        out[f"{k}_mean"] = 100 * sum(v) / len(v) if v else float("nan")
        out[f"{k}_max"] = 100 * max(v) if v else float("nan")
    print(
        f"relative error ({', '.join(FIT_PHASES)}): fitted points mean {out['fit_mean']:.0f}% "
        f"max {out['fit_max']:.0f}%; held-out points mean {out['held_out_mean']:.0f}% max "
        f"{out['held_out_max']:.0f}% (optim_step is analytic, not fitted)"
    )
    return out


# ----------------------------------------------------------------------------------- drivers
def layer_table(keys, cache: Path | None = None) -> dict[str, LayerSaved]:
    """``layer_saved_bytes`` for each shape key (and "tiny"), cached in ``cache`` (JSON)."""
    stored = json.loads(cache.read_text()) if cache and cache.exists() else {}
    out = {}
    for key in keys:
        if key not in stored:
            s = TINY if key == "tiny" else SHAPES[key]
            full, lora = layer_saved_bytes(s, False), layer_saved_bytes(s, True)
            stored[key] = {
                "full_per_token": full["per_token"],
                "full_weights": full["weights"],
                "lora_per_token": lora["per_token"],
                "lora_weights": lora["weights"],
            }
            if cache:
                cache.write_text(json.dumps(stored, indent=1))
        out[key] = LayerSaved(**stored[key])
    return out


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def run_measure_and_fit(args) -> tuple[Coeffs, dict[str, LayerSaved]]:
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="paper-scale-"))
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"CPU: {cpu_model_name()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}; results in {out}"
    )
    points = default_grid()
    print(f"measuring {len(points)} points (one subprocess each; cached in {out}/points.jsonl):")
    results = measure(points, out / "points.jsonl")
    lays = layer_table(list(SHAPES) + ["tiny"], out / "layers.json")
    print("\nsaved for backward per decoder layer (bf16 autocast; saved_tensors_hooks):")
    for key, lay in lays.items():
        if key == "tiny":
            continue
        s = SHAPES[key]
        print(
            f"  {s.name:13s} full FT {lay.full_per_token / 1024:6.1f} KiB/token "
            f"({lay.full_per_token / s.hidden:5.1f} x hidden) + "
            f"{lay.full_weights / s.layer_linear_params():.2f} B/weight;  LoRA "
            f"{lay.lora_per_token / 1024:6.1f} KiB/token + "
            f"{lay.lora_weights / s.layer_linear_params():.2f} B/weight"
        )
    fit_points = [r for r in results if r["point"]["label"].startswith("fit:")]
    c = fit_coeffs(fit_points, lays, DEFAULT_COEFFS)
    errors = print_fit_report(fit_report(results, c, lays))
    print(
        "fitted: "
        + ", ".join(
            f"{k}={v / GIB:.3f} GiB" if "const" in k else f"{k}={v:.3g}"
            for k, v in asdict(c).items()
        )
    )
    (out / "fit.json").write_text(json.dumps({"coeffs": asdict(c), "errors": errors}, indent=1))
    return c, lays


def summary(rows: list[dict]) -> None:
    print("\nsettings that fit (per backbone):")
    for key, s in SHAPES.items():
        ok = [r for r in rows if r["key"] == key and r["fits"]]
        text = (
            "; ".join(
                f"{r['setting']} (micro {r['micro']} rows, rollout {r['rollout']} rows, "
                f"{gib(r['best']['peak'])} GiB)"
                for r in ok
            )
            or "none"
        )
        print(f"  {s.name}: {text}")


def gpu_mode(args) -> None:
    """The full-size check: one rollout batch of the recipe on a Qwen2.5-1.5B-shaped model."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    key = "tiny" if args.tiny else "qwen"
    s = TINY if args.tiny else SHAPES["qwen"]
    recipe = Recipe(
        prompts=args.prompts,
        k=args.k,
        prompt_len=args.prompt_len,
        response_len=args.response_len,
        minibatch=min(16, args.prompts),
    )
    st = Setting(gc=not args.no_gc)
    lay = LAYER_SAVED_DEFAULT.get(key) or layer_table([key])[key]
    c, cap = DEFAULT_COEFFS, args.capacity_gib * GIB

    def plan(skipped=()):
        micro, roll = args.micro_rows, args.rollout_rows
        probe = predict_peak(s, st, recipe, c, lay)
        if micro is None:
            micro = (
                largest_fitting(
                    lambda m: predict_peak(s, st, recipe, c, lay, micro_rows=m)["phases"]["update"],
                    probe["micro_rows"],
                    cap,
                )
                or 1
            )
        if roll is None:
            roll = (
                largest_fitting(
                    lambda r: predict_peak(s, st, recipe, c, lay, rollout_rows=r)["phases"][
                        "rollout"
                    ],
                    probe["rollout_rows"],
                    cap,
                )
                or 1
            )
        pm = None if OPTIONAL_KNOBS["micro_rows"] in skipped else micro
        pr = None if OPTIONAL_KNOBS["roll_rows"] in skipped else roll
        return micro, roll, predict_peak(s, st, recipe, c, lay, micro_rows=pm, rollout_rows=pr)

    micro, roll, pred = plan()
    print(
        f"device {device}; {s.name} shape, {s.params() / 1e9:.2f}B params, random weights, "
        f"EOS off; {recipe.prompts} prompts x {recipe.k} rollouts (+{recipe.anchors} anchors "
        f"each), prompts {recipe.prompt_len} + responses {recipe.response_len} tokens; "
        f"{st.name()}; micro-batch {micro} rows, rollout budget {roll} rows"
    )
    print("predicted peak (GiB): " + ", ".join(f"{k} {gib(v)}" for k, v in pred["phases"].items()))
    point = Point(
        shape="qwen",
        layers=s.layers,
        groups=recipe.prompts,
        k=recipe.k,
        minibatch=recipe.minibatch,
        prompt_len=recipe.prompt_len,
        response_len=recipe.response_len,
        gc=st.gc,
        micro_rows=micro,
        roll_rows=roll,
        device=device,
        tiny=args.tiny,
        label="gpu",
    )
    r = run_point(point)
    _, _, pred = plan(r["skipped_knobs"])
    if r["skipped_knobs"]:
        print(f"knobs not in the config yet (not applied): {', '.join(r['skipped_knobs'])}")
    rows_all = recipe.prompts * (recipe.k + recipe.anchors)
    gen = rows_all * recipe.response_len
    print(
        f"step {r['step_s']:.1f} s (rollout {r['rollout_s']:.1f} s, update {r['update_s']:.1f} s);"
        f" rollout {gen / r['rollout_s']:.0f} generated tokens/s ({gen} tokens)"
    )
    kind = "CUDA max_memory_allocated" if "cuda_phase_bytes" in r else "RSS above the base"
    measured = r.get("cuda_phase_bytes") or r["peaks_above_base"]
    # the first rollout batch samples before any AdamW state exists (steady state: it does)
    first = dict(pred["phases"], rollout=pred["phases"]["rollout"] - pred["static"]["adam"])
    print(f"peak memory (GiB), measured ({kind}) vs predicted for this first rollout batch:")
    for phase in ("rollout", "update", "optim_step"):
        print(f"  {phase:10s} {gib(measured.get(phase)):>7s}  vs {gib(first[phase]):>7s}")
    print(json.dumps({"gpu_check": r, "predicted": pred["phases"]}, default=str)[:4000])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--point", default=None, help=argparse.SUPPRESS)  # child process
    p.add_argument(
        "--out",
        default=None,
        help="folder for points.jsonl / layers.json / fit.json "
        "(re-used: delete points.jsonl to measure again)",
    )
    p.add_argument(
        "--predict-only",
        action="store_true",
        help="skip the CPU measurements: the table from the stored coefficients",
    )
    p.add_argument(
        "--capacity-gib",
        type=float,
        default=74.0,
        help="usable GPU memory: an 80 GB H100 shows 79.6 GiB; minus CUDA context, "
        "workspaces and ~5%% allocator fragmentation",
    )
    p.add_argument("--gpu", action="store_true", help="the full-size check (one rollout batch)")
    p.add_argument("--device", default=None, help="--gpu: cuda (default when available) | cpu")
    p.add_argument("--tiny", action="store_true", help="--gpu: a tiny Qwen2 shape (smoke test)")
    p.add_argument("--prompts", type=int, default=64, help="--gpu: policy prompts (paper 64)")
    p.add_argument("--k", type=int, default=8, help="--gpu: rollouts per prompt (paper 8)")
    p.add_argument(
        "--prompt-len", type=int, default=1024, help="--gpu: prompt tokens (paper <=1024)"
    )
    p.add_argument("--response-len", type=int, default=2048, help="--gpu: response tokens (2048)")
    p.add_argument(
        "--micro-rows",
        type=int,
        default=None,
        help="--gpu: algo.micro_batch_size (default: the largest the model says fits)",
    )
    p.add_argument(
        "--rollout-rows",
        type=int,
        default=None,
        help="--gpu: rollout row budget (default: the largest the model says fits)",
    )
    p.add_argument(
        "--no-gc",
        action="store_true",
        help="--gpu: gradient checkpointing off (paper_sup has it on)",
    )
    args = p.parse_args()
    if args.point:
        print("RESULT " + json.dumps(run_point(Point(**json.loads(args.point)))))
        return
    if args.gpu:
        gpu_mode(args)
        return
    if args.predict_only:
        c, lays = DEFAULT_COEFFS, LAYER_SAVED_DEFAULT or layer_table(list(SHAPES))
    else:
        c, lays = run_measure_and_fit(args)
    cap = args.capacity_gib * GIB
    rows = paper_table(c, lays, Recipe(), cap)
    print_paper_table(rows, Recipe(), cap)
    summary(rows)
    fsdp = Recipe()
    print(
        f"(FSDP x4 rows: {fsdp.prompts // 4} prompts and {fsdp.minibatch // 4} groups per "
        "mini-batch on each GPU: data.prompts_per_step and algo.prompts_per_minibatch are global)"
    )


if __name__ == "__main__":
    main()
