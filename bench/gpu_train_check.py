"""`python train.py backbone=qwen reward=sup` itself on a GPU for a few rollout batches: CUDA peak
per phase next to the memory model (grace_lightning/scale.py), step time and decode speed.

    python bench/gpu_train_check.py                          # CUDA: Qwen2.5-1.5B shape, 3 rollout batches
    python bench/gpu_train_check.py trainer=fsdp trainer.devices=1   # extra overrides go to train.py
    python bench/gpu_train_check.py --cpu-smoke              # CPU: tiny width, checks the path composes

The run is train.py's own command line (the paper preset picked by ``experiment=auto``, its
startup hardware/memory check, Lightning, rollouts, updates) with what a machine without the Hub
and the paper's data needs: ``backbone.init=random`` (the Qwen2.5-1.5B architecture from its shipped
config.json, random weights, the embedded tokenizer), synthetic triplets of an exact prompt length
(bench/paper_scale.py's), EOS off (every rollout runs to ``--response-len``: exact token counts),
shorter responses than the paper's 2048 so that a few rollout batches fit the check's time, no
checkpoint and no export (GBs). It runs in this process (runpy) so that each phase can be
measured: ``GraceModule.rollout``, ``GraceModule.update`` without its optimiser steps, and the
AdamW step (bench/paper_scale.py's PhasePeaks: ``torch.cuda.max_memory_allocated`` per phase).
The memory model's phases are for the same composed config (steady state: AdamW state present).
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

GIB = 2**30

# --cpu-smoke: the same path on a CPU in seconds (the real vocabulary would take minutes)
SMOKE_SHAPE = dict(
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=49152,
)


def overrides(args, data_dir: Path, run_dir: Path) -> list[str]:
    steps = args.rollout_batches * (args.prompts // args.minibatch)
    out = [
        "backbone=qwen",
        "reward=sup",
        # what this machine lacks: the Hub weights and the paper's data
        "backbone.init=random",
        f"data.root={data_dir}",
        "data.sup.path=triplets.jsonl",
        "data.val_fraction=0",
        # a few short rollout batches of the paper's shape
        f"data.prompts_per_step={args.prompts}",
        f"algo.prompts_per_minibatch={args.minibatch}",
        f"rollout.num_generations={args.k}",
        f"rollout.max_new_tokens={args.response_len}",
        f"prompt.max_prompt_tokens={args.prompt_len}",
        f"algo.max_tokens_per_micro_batch={max(16384, args.prompt_len + args.response_len)}",
        "rollout.ignore_eos=true",
        f"trainer.max_steps={steps}",
        "trainer.enable_progress_bar=false",
        "logger=none",
        "callbacks.model_checkpoint=null",  # GBs of checkpoint and export: not what is checked
        "+trainer.enable_checkpointing=false",
        "callbacks.export=null",
        "callbacks.trim_table_on_resume=null",
        "model.logging_cfg.table_every_n_steps=0",
        f"hydra.run.dir={run_dir}",
    ]
    if args.cpu_smoke:
        out += ["allow_cpu=true", "backbone.dtype=float32"]
        out += [f"+backbone.init_config.{k}={v}" for k, v in SMOKE_SHAPE.items()]
    return out + list(args.extra)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny width on the CPU (seconds)")
    p.add_argument("--rollout-batches", type=int, default=None, help="default 3 (smoke: 2)")
    p.add_argument("--prompts", type=int, default=None, help="per rollout batch; default 64")
    p.add_argument("--minibatch", type=int, default=None, help="per optimiser step; default 16")
    p.add_argument("--k", type=int, default=None, help="rollouts per prompt; default 8")
    p.add_argument("--prompt-len", type=int, default=None, help="default 256 (smoke: 64)")
    p.add_argument("--response-len", type=int, default=None, help="default 512 (smoke: 4)")
    p.add_argument("extra", nargs="*", help="more train.py overrides, e.g. trainer=fsdp")
    args = p.parse_args()
    smoke = args.cpu_smoke
    defaults = dict(
        rollout_batches=2 if smoke else 3,
        prompts=4 if smoke else 64,
        minibatch=2 if smoke else 16,
        k=2 if smoke else 8,
        prompt_len=64 if smoke else 256,
        response_len=4 if smoke else 512,
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    import torch
    from paper_scale import PhasePeaks, synthetic_triplets, timed_methods

    import grace_lightning.module as module_mod
    import grace_lightning.train as train_mod
    from grace_lightning.models.backbone import BackboneConfig, load_tokenizer
    from grace_lightning.prompts import ChatPrompter

    if smoke:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    cuda = torch.cuda.is_available() and not smoke
    peaks = PhasePeaks(cuda=cuda)
    cls = module_mod.GraceModule
    cls.rollout = peaks.wrap(cls.rollout, "rollout")
    cls.update = peaks.wrap(cls.update, "update")
    torch.optim.AdamW.step = peaks.wrap(torch.optim.AdamW.step, "optim_step", exclude=True)
    times = timed_methods(cls, ("rollout", "update", "training_step"))
    seen: dict = {}
    real_train = train_mod.train

    def train(cfg):  # keep the composed config for the model's prediction
        seen["cfg"] = cfg
        return real_train(cfg)

    train_mod.train = train

    with tempfile.TemporaryDirectory(prefix="gpu-train-check-", ignore_cleanup_errors=True) as d:
        tmp = Path(d)
        tok = load_tokenizer(BackboneConfig())
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            system = compose("train", overrides=["experiment=none"]).prompt.system_prompt
        prompter = ChatPrompter(tok, system, args.prompt_len)
        rows = synthetic_triplets(
            tok, prompter, args.prompts * args.rollout_batches, args.prompt_len
        )
        # distinct texts (the sampler and the rollout seeds see different examples), same length
        for i, row in enumerate(rows):
            row["query"] = f"{i} {row['query']}"
        (tmp / "triplets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        argv = overrides(args, tmp, tmp / "run")
        print("python train.py " + " ".join(argv), flush=True)
        sys.argv = ["train.py", *argv]
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
        except SystemExit as e:  # Hydra / the hardware check
            if e.code not in (None, 0):
                raise
        wall = time.perf_counter() - t0
    report(args, seen.get("cfg"), peaks, times, wall, cuda)


def report(args, cfg, peaks, times, wall: float, cuda: bool) -> None:
    if cfg is None or not times["training_step"]:
        raise SystemExit("gpu_train_check: train.py did not run a rollout batch")
    from grace_lightning import scale
    from grace_lightning.presets import world_size

    n = len(times["training_step"])
    later = slice(1, None) if n > 1 else slice(None)  # the first batch also warms up CUDA
    step = sum(times["training_step"][later]) / len(times["training_step"][later])
    roll = sum(times["rollout"][later]) / len(times["rollout"][later])
    anchors = 2  # sup: the query and one negative per prompt
    generated = args.prompts * (args.k + anchors) * args.response_len
    print(
        f"{n} rollout batches in {wall:.0f} s (model build and set-up included); per rollout "
        f"batch after the first: {step:.1f} s (rollout {roll:.1f} s); decode "
        f"{generated / roll:.0f} generated tokens/s ({args.prompts} prompts x ({args.k} + "
        f"{anchors}) rows x {args.response_len} tokens, prompts {args.prompt_len} tokens)"
    )
    world = world_size(cfg) or 1
    pred, setting = None, ""
    shape = scale.config_shape(cfg)
    if shape is not None and not args.cpu_smoke:
        recipe, st, micro, rollout_rows = scale.config_recipe(cfg, world)
        pred = scale.predict_peak(shape, st, recipe, micro_rows=micro, rollout_rows=rollout_rows)
        setting = f"{st.name()}, micro-batch {pred['micro_rows']} rows, {pred['rollout_rows']} rows sampled at once"
    kind = "CUDA max_memory_allocated" if cuda else "RSS above the phase's start"
    measured = peaks.cuda_peak if cuda else peaks.peak
    print(f"peak memory (GiB) per phase, measured ({kind}) vs the memory model (steady state):")
    for phase in ("rollout", "update", "optim_step"):
        got = measured.get(phase)
        want = pred["phases"][phase] if pred else None
        ratio = f"  ({got / want:.2f}x)" if got and want else ""
        shown = f"{got / GIB:7.2f}" if got is not None else "    n/a"
        model = f"{want / GIB:7.2f}" if want is not None else "    n/a"
        print(f"  {phase:10s} {shown}  vs {model}{ratio}")
    if pred:
        print(f"  model: peak {pred['peak'] / GIB:.2f} GiB in {pred['phase']}; {setting}")


if __name__ == "__main__":
    main()
