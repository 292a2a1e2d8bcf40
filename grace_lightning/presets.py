"""Which preset a command runs, and whether the machine can run it (docs/presets.md).

``python train.py [backbone=...] [reward=...] [method=...]`` without ``experiment=`` runs the
preset that fits the backbone (conf/train.yaml's ``experiment: auto``):

=============================  ==============================  =======================================
backbone                       method=grace (reward=sup|unsup)  method=infonce | simcse
=============================  ==============================  =======================================
qwen, qwen3b, llama, qwen3     paper_sup | paper_unsup (GPU)   paper_infonce | paper_simcse (GPU)
smollm2 (default), tiny, other quickstart | quickstart_unsup   quickstart_infonce | quickstart_simcse
=============================  ==============================  =======================================

Hydra's defaults list cannot branch on a value (an interpolated ``experiment: ${...}`` entry may not
carry the ``override /trainer: gpu`` lines the paper presets need), so train.py rewrites its
command line before Hydra composes (:func:`resolve_overrides`); a sweep over the reward becomes a
sweep over the matching presets, so each multirun job gets its own. Composed without train.py,
``experiment=auto`` is the quickstart (conf/experiment/auto.yaml).

At startup (:func:`check_hardware`, before any weights load): a GPU preset on a machine without a
GPU stops with one line (what it would run, the step time by the FLOP model on this CPU, the short
job to run instead) unless ``allow_cpu=true``; on a GPU, a recipe whose predicted peak (the memory
model of ``grace_lightning.scale``, which bench/paper_scale.py fits) exceeds the GPU's memory
stops with the command that fits, unless ``memory_check=false``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

PAPER_BACKBONES = ("qwen", "qwen3b", "llama", "qwen3")
CONTRASTIVE_METHODS = ("infonce", "simcse")
# conf/train.yaml's group defaults (tests/test_presets.py checks they agree)
DEFAULT_CHOICES = {"backbone": "smollm2", "reward": "sup", "method": "grace"}
AUTO = "auto"  # conf/train.yaml's default experiment
# the short job a machine without a GPU can run instead (an embedded quickstart, 5-10 minutes)
SHORT_JOB = {"sup": "python train.py", "unsup": "python train.py reward=unsup"}


def short_job(cfg: DictConfig) -> str:
    """The embedded quickstart of the run's method and reward (the table above)."""
    objective = contrastive_objective(cfg)
    if objective is not None:
        return f"python train.py method={objective}"
    return SHORT_JOB.get(str(cfg.reward.mode), SHORT_JOB["sup"])


def preset_for(backbone: str, reward: str = "sup", method: str = "grace") -> str:
    """The experiment ``auto`` stands for (the table in the module docstring)."""
    paper = backbone in PAPER_BACKBONES
    if method in CONTRASTIVE_METHODS:
        return f"{'paper' if paper else 'quickstart'}_{method}"
    if paper:
        return f"paper_{reward}"
    return "quickstart" if reward == "sup" else "quickstart_unsup"


class PresetError(ValueError):
    """The command line's sweep mixes presets that one ``experiment`` value cannot follow."""


def _parse(arg: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(arg)


def _values(override) -> list[str]:
    if override.is_sweep_override():
        return [str(v) for v in override.sweep_string_iterator()]
    return [str(override.value())]


def resolve_overrides(args: list[str]) -> list[str]:
    """``args`` (train.py's command line) with ``experiment=auto`` made explicit.

    Unchanged when ``experiment`` is given or ``auto`` is the quickstart (``python train.py``
    composes as before). Otherwise ``experiment=<preset>`` joins the overrides (before the
    first one: argparse wants them in one run after any flag); a multirun over
    ``reward=a,b`` whose preset follows the reward becomes ``experiment=<preset a>,<preset b>``
    (each preset selects its reward). Raises :class:`PresetError` when one sweep mixes presets
    in another way (e.g. ``backbone=smollm2,qwen``): name the experiment then.
    """
    found: dict[str, tuple[int, Any]] = {}
    first = None  # where the overrides start (argparse wants them together, after no flag)
    for i, arg in enumerate(args):
        if arg.startswith("-") or "=" not in arg:  # flags (--cfg job, -m), their values
            continue
        first = i if first is None else first
        key = arg.split("=", 1)[0].lstrip("+~")
        if key in ("experiment", "backbone", "reward", "method"):
            found[key] = (i, _parse(arg))
    if "experiment" in found:
        chosen = _values(found["experiment"][1])
        if chosen != [AUTO]:
            return list(args)
        args = [a for j, a in enumerate(args) if j != found["experiment"][0]]
        return resolve_overrides(args)
    values = {
        k: _values(found[k][1]) if k in found else [default]
        for k, default in DEFAULT_CHOICES.items()
    }
    by_reward: dict[str, set[str]] = {}
    for b in values["backbone"]:
        for r in values["reward"]:
            for m in values["method"]:
                by_reward.setdefault(r, set()).add(preset_for(b, r, m))
    presets = set().union(*by_reward.values())
    if presets == {"quickstart"}:
        return list(args)  # experiment=auto is the quickstart
    if len(presets) == 1:
        at = 0 if first is None else first
        return [*args[:at], f"experiment={presets.pop()}", *args[at:]]
    rewards = values["reward"]
    if "reward" in found and all(len(p) == 1 for p in by_reward.values()):
        # one preset per reward: sweep the presets instead of the reward (each selects its reward)
        per = [next(iter(by_reward[r])) for r in rewards]
        if all(_selects_reward(p, r) for p, r in zip(per, rewards)):
            i = found["reward"][0]
            return [*args[:i], f"experiment={','.join(per)}", *args[i + 1 :]]
    shown = " ".join(f"{k}={','.join(v)}" for k, v in values.items())
    raise PresetError(
        f"{shown} runs different presets ({', '.join(sorted(presets))}) that one experiment= "
        f"value cannot follow: add experiment=<preset> (docs/presets.md), or sweep experiment= "
        f"instead of the option that changes the preset"
    )


def _selects_reward(preset: str, reward: str) -> bool:
    """Does ``preset`` set ``reward`` by itself (so the reward= override may go)?"""
    return {
        "paper_sup": "sup",
        "paper_unsup": "unsup",
        "quickstart_unsup": "unsup",
        "quickstart": DEFAULT_CHOICES["reward"],
        "paper_infonce": "sup",
        "paper_simcse": "unsup",
        "quickstart_infonce": "sup",
        "quickstart_simcse": "unsup",
    }.get(preset) == reward


# ------------------------------------------------------------------------------ hardware
def world_size(cfg: DictConfig, cuda_devices: int | None = None) -> int | None:
    """trainer.devices x trainer.num_nodes; None when ``devices`` is "auto"/-1 and unknown."""
    t = cfg.trainer
    devices = t.get("devices", 1)
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        n = len(devices)
    elif isinstance(devices, str) and "," in devices:
        n = len([d for d in devices.split(",") if d.strip()])
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        n = devices
    elif str(devices).isdigit() and int(devices) > 0:
        n = int(devices)
    elif cuda_devices and str(t.get("accelerator")) in ("gpu", "cuda"):
        n = cuda_devices  # "auto" / -1 on GPUs: every visible GPU
    else:
        return None
    return n * int(t.get("num_nodes", 1) or 1)


def wants_gpu(cfg: DictConfig) -> bool:
    return str(cfg.trainer.get("accelerator", "cpu")) in ("gpu", "cuda")


def backbone_model_shape(cfg: DictConfig):
    """The backbone's :class:`~grace_lightning.scale.Shape` from its config.json (shipped
    for the paper backbones, or a local dir's), without loading weights; None if unknown."""
    from grace_lightning.models.backbone import BackboneConfig, random_init_config

    try:
        config = random_init_config(BackboneConfig(**OmegaConf.to_container(cfg.backbone)))
    except (ValueError, TypeError, KeyError, OSError):
        return None
    from grace_lightning.scale import Shape

    return Shape.from_hf_config(config)


def contrastive_objective(cfg: DictConfig) -> str | None:
    """``infonce`` / ``simcse`` for a contrastive baseline run (method=infonce|simcse), else None."""
    objective = OmegaConf.select(cfg, "model.objective", default=None)
    return str(objective) if objective in CONTRASTIVE_METHODS else None


def step_estimate(cfg: DictConfig, gflops: float) -> dict[str, float]:
    """FLOPs and seconds of one step at ``gflops`` GFLOP/s (the matmul roofline: a lower bound),
    prompts of ``prompt_tokens`` tokens (a typical length: the system prompt + a short text).
    GRACE: one rollout batch, responses at their full ``rollout.max_new_tokens`` (EOS off, the
    worst case). A contrastive baseline: one optimiser step over ``data.prompts_per_step``
    triplets (InfoNCE: query, positive, hard negative) or sentences (SimCSE: two views each)."""
    from grace_lightning.flops import contrastive_step_flops, grace_step_flops

    shape = backbone_model_shape(cfg)
    if shape is None:
        return {}
    b = int(cfg.data.prompts_per_step)
    p = min(int(cfg.prompt.max_prompt_tokens), 128)
    objective = contrastive_objective(cfg)
    if objective is not None:
        from grace_lightning.scale import TEXTS_PER_ITEM

        texts = b * TEXTS_PER_ITEM[objective]
        flops = float(contrastive_step_flops(shape, [p] * texts))
        return {"flops": flops, "seconds": flops / (gflops * 1e9), "prompt_tokens": p}
    k = int(cfg.rollout.num_generations)
    r = int(cfg.rollout.max_new_tokens)
    anchors = b * 2 if cfg.reward.mode == "sup" else b  # query + one negative, or the self-anchor
    parts = grace_step_flops(shape, [p] * b, [p] * anchors, k, r)
    flops = float(parts["rollout"] + parts["update"]) * int(cfg.algo.num_iterations)
    return {"flops": flops, "seconds": flops / (gflops * 1e9), "prompt_tokens": p}


def cpu_gflops(cfg: DictConfig, seconds: float = 0.2) -> float:
    """This CPU's bf16 (fp32 if the precision is 32) matmul GFLOP/s on one decoder-layer-sized
    product, measured in ``seconds`` (the benches' ``matmul_gflops``)."""
    import torch

    from grace_lightning.flops import matmul_gflops

    shape = backbone_model_shape(cfg)
    hidden, inter = (shape.hidden, shape.intermediate) if shape else (1536, 8960)
    dtype = torch.bfloat16 if "bf16" in str(cfg.trainer.get("precision")) else torch.float32
    return matmul_gflops(256, hidden, inter, dtype, min_seconds=seconds)


def _duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.0f} h"
    if seconds >= 120:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def experiment_choice(cfg: DictConfig) -> str | None:
    """The ``experiment=`` option the config was composed with (None when unknown, e.g. a config
    built by hand): from the composed ``hydra`` node, else from the running Hydra app."""
    choice = OmegaConf.select(cfg, "hydra.runtime.choices.experiment", default=None)
    if choice is None:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            choice = HydraConfig.get().runtime.choices.get("experiment")
    return choice


def describe(cfg: DictConfig) -> str:
    """What the run is: backbone, preset, recipe and horizon, in a few words."""
    steps = int(cfg.trainer.get("max_steps", -1))
    objective = contrastive_objective(cfg)
    if objective is not None:
        epochs = int(cfg.trainer.get("max_epochs", -1) or -1)
        if steps > 0:
            horizon = f"{steps} steps"
        elif epochs > 0:
            horizon = f"{epochs} epoch" + ("s" if epochs != 1 else "")
        else:
            horizon = "no step limit"
        unit = "triplets" if objective == "infonce" else "sentences (two views each)"
        return (
            f"backbone={cfg.backbone.name} method={objective} "
            f"(experiment={experiment_choice(cfg) or '?'}): {cfg.data.prompts_per_step} {unit} "
            f"a step, {horizon}, trainer.accelerator={cfg.trainer.accelerator}"
        )
    per = max(1, math.ceil(int(cfg.data.prompts_per_step) / int(cfg.algo.prompts_per_minibatch)))
    per *= int(cfg.algo.num_iterations)
    horizon = f"{steps // per} rollout batches" if steps > 0 else "no step limit"
    return (
        f"backbone={cfg.backbone.name} reward={cfg.reward.mode} "
        f"(experiment={experiment_choice(cfg) or '?'}): {cfg.data.prompts_per_step} prompts x "
        f"{cfg.rollout.num_generations} rollouts x {cfg.rollout.max_new_tokens} new tokens a "
        f"rollout batch, {horizon}, trainer.accelerator={cfg.trainer.accelerator}"
    )


class HardwareError(ValueError):
    """The run cannot go on this machine as configured (see :func:`check_hardware`)."""


def check_hardware(cfg: DictConfig, cuda: Any = None) -> None:
    """Stop at startup (before data and weights load) where the machine cannot run ``cfg``.

    ``cuda``: the CUDA queries (``torch.cuda`` by default; tests pass a fake with
    ``is_available()``, ``device_count()``, ``get_device_properties(i).total_memory``).
    With ``allow_cpu=true`` a GPU recipe on a machine without a GPU runs on the CPU instead
    (``trainer.accelerator`` becomes ``cpu``; bf16-mixed stays, as trainer=cpu_bf16).
    """
    if cuda is None:
        import torch

        cuda = torch.cuda
    if not wants_gpu(cfg):
        return
    if not cuda.is_available():
        est = step_estimate(cfg, cpu_gflops(cfg))
        step = "a step" if contrastive_objective(cfg) else "a rollout batch"
        when = (
            f"~{_duration(est['seconds'])} {step} on this CPU by the FLOP model "
            f"({est['flops'] / 1e15:.1f} PFLOP at its measured matmul roofline, a lower bound)"
            if est
            else f"an unknown time {step} on this CPU (no shape for this backbone)"
        )
        if cfg.get("allow_cpu", False):
            log.warning("allow_cpu=true: %s on the CPU, %s", describe(cfg), when)
            OmegaConf.update(cfg, "trainer.accelerator", "cpu", force_add=True)
            return
        raise HardwareError(
            f"No GPU here (torch.cuda.is_available() is false). {describe(cfg)}: {when}. "
            f"The short job for this machine: `{short_job(cfg)}` (the embedded quickstart, "
            f"5-10 min); to run this recipe on the CPU anyway add "
            f"allow_cpu=true."
        )
    if not cfg.get("memory_check", True):
        return
    check_gpu_memory(cfg, cuda)


def check_gpu_memory(cfg: DictConfig, cuda: Any) -> None:
    """The memory model's peak per GPU (``grace_lightning.scale.predict_config_peak``, the model
    bench/paper_scale.py fits) against what it allows of the smallest visible GPU's memory
    (``scale.usable_memory``: CUDA context and fragmentation aside)."""
    from grace_lightning import scale

    fit = scale.predict_config_peak
    n = int(cuda.device_count())
    world = world_size(cfg, cuda_devices=n) or 1
    total = min(cuda.get_device_properties(i).total_memory for i in range(max(1, n)))
    usable = scale.usable_memory(total)
    peak = fit(cfg, world)
    if peak is None or peak <= usable:
        log.info("memory model: ~%.1f GiB a GPU of %.1f GiB", (peak or 0) / 2**30, total / 2**30)
        return
    gib = 2**30
    fixes = suggest_fits(cfg, world, n, usable, fit)
    hint = (
        f"What fits by the same model: `{fixes[0]}`"
        if fixes
        else "Nothing this check tries fits (LoRA, smaller rollout sub-batches, FSDP)"
    )
    raise HardwareError(
        f"{describe(cfg)} needs ~{peak / gib:.0f} GiB a GPU by the memory model "
        f"(grace_lightning/scale.py), more than the {usable / gib:.0f} of {total / gib:.0f} GiB "
        f"of this GPU it allows. {hint}. memory_check=false skips this check."
    )


def suggest_fits(cfg: DictConfig, world: int, gpus: int, total: float, fit) -> list[str]:
    """Commands that fit ``total`` bytes a GPU by the memory model, least change to the recipe
    first: fewer rows sampled at once (speed only; a contrastive baseline: gradient
    checkpointing, then texts cut shorter), FSDP over the visible GPUs (the same maths), LoRA
    (another recipe). Each is this run's command line plus the change."""
    trials: list[tuple[str, dict[str, Any]]] = []
    if contrastive_objective(cfg) is not None:
        # one forward over the whole batch (no micro-batches): checkpointing, then shorter texts
        if not OmegaConf.select(cfg, "model.gradient_checkpointing", default=False):
            gc = {"model.gradient_checkpointing": True}
            trials.append(("model.gradient_checkpointing=true", gc))
        cut = OmegaConf.select(cfg, "model.max_text_tokens", default=None)
        for n in (256, 128):
            if cut is None or n < int(cut):
                trials.append((f"model.max_text_tokens={n}", {"model.max_text_tokens": n}))
    else:
        rows = OmegaConf.select(cfg, "rollout.max_rows_per_batch", default=None)
        for r in (64, 32, 16):
            if rows is None or r < int(rows):
                change = {"rollout.max_rows_per_batch": r}
                trials.append((f"rollout.max_rows_per_batch={r}", change))
    if gpus > 1:
        fsdp = {"trainer.strategy": "fsdp", "trainer.devices": gpus}
        trials.append((f"trainer=fsdp trainer.devices={gpus}", fsdp))
    trials.append(("peft=lora", {"peft": {"r": 16}}))
    out = []
    for text, changes in trials:
        trial = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
        for key, value in changes.items():
            OmegaConf.update(trial, key, value, force_add=True, merge=False)
        w = gpus if "trainer.devices" in changes else world
        peak = fit(trial, w)
        if peak is not None and peak <= total:
            out.append(f"{command_line(cfg, drop=text)} {text}")
    return out


def command_line(cfg: DictConfig, drop: str = "") -> str:
    """``python train.py <this run's overrides>`` (Hydra's record of the command line; the
    preset train.py added is left out when it is the one ``auto`` picks), without the overrides
    of the groups/keys in ``drop``."""
    task = OmegaConf.select(cfg, "hydra.overrides.task", default=None)
    if task is None:
        task = [f"backbone={cfg.backbone.name}", f"reward={cfg.reward.mode}"]
    method = str(OmegaConf.select(cfg, "model.objective", default=None) or "grace")
    auto = f"experiment={preset_for(str(cfg.backbone.name), str(cfg.reward.mode), method)}"
    dropped = {d.split("=")[0] for d in drop.split()}
    last = {str(o).split("=")[0]: str(o) for o in task}  # a later override of a key wins
    kept = [o for o in last.values() if o != auto and o.split("=")[0] not in dropped]
    return " ".join(["python train.py", *kept])
