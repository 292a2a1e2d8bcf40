"""Seconds per GRACE step on the embedded default, next to a bare reference of the same shape.

    python bench/train_step.py [--steps 3] [--groups 4] [--k 8] [--new-tokens 64] [--prompt-tokens 256]

Shape: 4 triplets x 8 rollouts x 64 new tokens, prompts up to 256 tokens; one optimiser step per
rollout batch. Every response runs the full 64 tokens (EOS disabled) so both sides do the same work.
Each part runs in its own subprocess so peak RSS is its own.
- grace:     the real training step (Lightning Trainer, GraceModule) split into rollout,
             embed + reward, update (median over steps after the first, which warms up).
- reference: one batched ``model.generate`` of the same shape (policy prompts x K + anchors),
             then one forward/backward over the same policy sequences.
For scale, TRL 1.16 GRPOTrainer with a GRACE reward at this shape: 133 s/step, 9.8 GB peak RSS
(measured on this kind of 2-core machine; see the issue). Goal: <= 0.35x that (~45 s).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRL_SECONDS, TRL_RSS_GB = 133.0, 9.8


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def compose(args, out_dir: str):
    from hydra import compose, initialize_config_dir

    overrides = [
        "backbone=smollm2",
        "reward=sup",
        f"data.prompts_per_step={args.groups}",
        f"algo.prompts_per_minibatch={args.groups}",
        f"rollout.num_generations={args.k}",
        f"rollout.max_new_tokens={args.new_tokens}",
        f"prompt.max_prompt_tokens={args.prompt_tokens}",
        f"trainer.max_steps={args.steps}",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        "callbacks=none",
        "model.logging_cfg.table_every_n_steps=0",
        "rollout.ignore_eos=true",
        f"paths.output_dir={out_dir}",
    ]
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = out_dir
    HydraConfig().set_config(cfg)
    return cfg


def run_grace(args) -> dict:
    import csv
    import tempfile

    from grace_lightning.train import train

    out = tempfile.mkdtemp(prefix="bench-")
    cfg = compose(args, out)
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    with open(next(Path(out).rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    steps = [r for r in rows if r.get("time/rollout")]
    keep = steps[1:] or steps  # first step warms up
    med = {
        k: statistics.median(float(r[k]) for r in keep)
        for k in ("time/rollout", "time/reward", "time/update")
    }
    n_tok = args.groups * args.k * args.new_tokens + (2 * args.groups) * args.new_tokens
    return {
        "rollout_s": med["time/rollout"],
        "embed_reward_s": med["time/reward"],
        "update_s": med["time/update"],
        "step_s": sum(med.values()),
        "gen_tok_per_s": n_tok / med["time/rollout"],
        "mean_length": statistics.median(float(r["completions/mean_length"]) for r in keep),
        "peak_rss_gb": peak_rss_gb(),
        "wall_s": wall,
    }


def run_reference(args) -> dict:
    import torch

    from grace_lightning.data.offline import ensure_offline_default
    from grace_lightning.data.readers import read_triplets
    from grace_lightning.models.backbone import BackboneConfig, load_backbone
    from grace_lightning.prompts import DEFAULT_SYSTEM_PROMPT, ChatPrompter

    torch.manual_seed(0)
    model, tok = load_backbone(BackboneConfig())
    triplets, _ = read_triplets(ensure_offline_default()["sup"], max_examples=args.groups)
    pr = ChatPrompter(tok, DEFAULT_SYSTEM_PROMPT, args.prompt_tokens)
    policy = pr.encode([t.positive for t in triplets])
    anchors = pr.encode([t.query for t in triplets] + [t.negatives[0] for t in triplets])
    seqs = [p for p in policy for _ in range(args.k)] + anchors
    batch = tok.pad({"input_ids": seqs}, return_tensors="pt", padding_side="left")
    gen_kwargs = dict(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
    )
    model.eval()
    times = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**batch, **gen_kwargs)
    times["generate_s"] = time.perf_counter() - t0
    n_policy = len(policy) * args.k
    full = out[:n_policy]
    mask = (batch["attention_mask"][:n_policy]).clone()
    mask = torch.cat([mask, torch.ones(n_policy, args.new_tokens, dtype=mask.dtype)], dim=1)
    model.train()
    t0 = time.perf_counter()
    logits = model(input_ids=full, attention_mask=mask).logits[:, -args.new_tokens - 1 : -1].float()
    logp = logits.log_softmax(-1).gather(-1, full[:, -args.new_tokens :, None]).squeeze(-1)
    logp.mean().backward()
    times["fwd_bwd_s"] = time.perf_counter() - t0
    times["step_s"] = times["generate_s"] + times["fwd_bwd_s"]
    times["gen_tok_per_s"] = len(seqs) * args.new_tokens / times["generate_s"]
    times["peak_rss_gb"] = peak_rss_gb()
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--part", choices=["grace", "reference"], default=None)
    args = p.parse_args()
    if args.part:
        result = run_grace(args) if args.part == "grace" else run_reference(args)
        print("RESULT " + json.dumps(result))
        return
    results = {}
    for part in ("reference", "grace"):
        cmd = [sys.executable, __file__, "--part", part] + sys.argv[1:]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{part} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results[part] = json.loads(line[-1][7:])
    g, r = results["grace"], results["reference"]
    print(
        f"shape: {args.groups} triplets x {args.k} rollouts x {args.new_tokens} new tokens, prompts <= {args.prompt_tokens} tokens; torch threads={os.cpu_count()}"
    )
    print(f"{'':28s}{'GRACE step':>12s}{'bare ref':>12s}{'TRL 1.16':>12s}")
    print(
        f"{'rollout / generate (s)':28s}{g['rollout_s']:12.1f}{r['generate_s']:12.1f}{33.0:12.1f}"
    )
    print(f"{'embed + reward (s)':28s}{g['embed_reward_s']:12.2f}{'-':>12s}{17.0:12.1f}")
    print(f"{'update / fwd+bwd (s)':28s}{g['update_s']:12.1f}{r['fwd_bwd_s']:12.1f}{83.0:12.1f}")
    print(f"{'step (s)':28s}{g['step_s']:12.1f}{r['step_s']:12.1f}{TRL_SECONDS:12.1f}")
    print(
        f"{'generated tokens/s':28s}{g['gen_tok_per_s']:12.1f}{r['gen_tok_per_s']:12.1f}{'-':>12s}"
    )
    print(
        f"{'peak RSS (GB)':28s}{g['peak_rss_gb']:12.2f}{r['peak_rss_gb']:12.2f}{TRL_RSS_GB:12.1f}"
    )
    print(
        f"GRACE step / TRL step = {g['step_s'] / TRL_SECONDS:.2f}x (goal <= 0.35x); GRACE / bare reference = {g['step_s'] / r['step_s']:.2f}x"
    )


if __name__ == "__main__":
    main()
