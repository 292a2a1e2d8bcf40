"""Seconds per GRACE step next to a bare reference and TRL's GRPOTrainer, measured in ONE run.

    python bench/train_step.py [--precision fp32|bf16] [--new-tokens 64] [--repeats 1]
                               [--rollout-engine hf,vllm]
                               [--groups 4] [--k 8] [--data FILE] [--peer trl|none]

Same prompts for every column: the first ``groups x repeats`` triplets of ``--data`` (default
``../shared/data/bench_triplets/triplets.jsonl``: 42 hand-written triplets whose policy prompts are
204-246 tokens with the GRACE system prompt and SmolLM2's chat template). Shape: ``groups``
triplets x ``k`` rollouts x ``new-tokens`` new tokens; every response runs the full length (EOS
suppressed) so every column does the same sampling work. One optimiser step per rollout batch.
Each column runs in its own subprocess, so its peak RSS is its own:

- grace:     the real training step (Lightning Trainer + GraceModule, ``trainer=cpu`` or
             ``trainer=cpu_bf16``) split into rollout, embed + reward, update;
- reference: one batched ``model.generate`` (policy prompts x K + anchors), then one
             full-sequence forward/backward over the policy rows: the bare work, no framework;
- trl:       TRL 1.16 ``GRPOTrainer`` with a GRACE reward function. TRL has no hidden-state
             hook, so the reward re-generates the query and negative rationales (T=0.5) and
             re-encodes every sequence (mean over text + rationale, system prompt excluded).
             Timed per step by a callback; rollout = ``model.generate`` calls, update = the rest.
             Installed by the optional extra: ``pip install -e .[bench]``.

Before the columns, the parent process measures ``torch.matmul`` throughput on the model's own
matmul shapes (fp32 and bf16, this process's threads), and prints the machine's CPU model and ISA
flags (AMX, AVX512-BF16). The roofline lines divide each phase's matrix FLOPs (counted from the
model's shape and the token counts, bench/_common.py) by its seconds and by that throughput.
Every ratio printed comes from columns measured in this run; nothing is carried over from
another machine. Default is 1 measured step per column, no warm-up (``--repeats`` for more: the
median is reported).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import (  # noqa: E402
    ModelShape,
    cpu_info,
    describe_cpu,
    grace_step_flops,
    matmul_throughput,
    peak_rss_gb,
    reference_step_flops,
    trl_step_flops,
)

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "bench_triplets" / "triplets.jsonl"
PARTS = ("grace", "grace_vllm", "reference", "trl")  # grace_vllm: --rollout-engine vllm
DTYPE = {"fp32": "float32", "bf16": "bfloat16"}


# ----------------------------------------------------------------------------- shared inputs
def load_triplets(args):
    from grace_lightning.data.readers import read_triplets

    triplets, _ = read_triplets(args.data, max_examples=args.groups * args.repeats)
    if len(triplets) < args.groups * args.repeats:
        sys.exit(
            f"{args.data}: {len(triplets)} triplets, need groups x repeats = "
            f"{args.groups * args.repeats}; lower --repeats or --groups"
        )
    return triplets


def steps_of(triplets, groups: int):
    return [triplets[i : i + groups] for i in range(0, len(triplets), groups)]


def autocast(precision: str):
    import contextlib

    import torch

    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- grace
def compose(args, out_dir: str, engine: str = "hf"):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    overrides = [
        "experiment=none",  # the group defaults, not the quickstart preset
        "backbone=smollm2",
        "reward=sup",
        "data=shared",
        f"data.sup.path={Path(args.data).resolve()}",
        "data.sup.query_field=query",
        "data.sup.negative_field=negative",
        f"data.max_examples={args.groups * args.repeats}",
        "data.val_fraction=0",
        f"data.prompts_per_step={args.groups}",
        f"algo.prompts_per_minibatch={args.groups}",  # one optimiser step per rollout batch
        f"rollout.num_generations={args.k}",
        f"rollout.max_new_tokens={args.new_tokens}",
        "rollout.ignore_eos=true",
        f"prompt.max_prompt_tokens={args.prompt_tokens}",
        "trainer=cpu_bf16" if args.precision == "bf16" else "trainer=cpu",
        f"trainer.max_steps={args.repeats}",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        "callbacks=none",
        "model.logging_cfg.table_every_n_steps=0",
        f"paths.output_dir={out_dir}",
        f"rollout.engine={engine}",
    ]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = out_dir
    HydraConfig().set_config(cfg)
    return cfg


def run_grace(args, engine: str = "hf") -> dict:
    import csv

    from grace_lightning.train import train

    extra = {}
    # checkpoints of a run are not part of the measurement: the directory goes with the run
    with tempfile.TemporaryDirectory(prefix="bench-", ignore_cleanup_errors=True) as out:
        cfg = compose(args, out, engine)
        if engine == "vllm":  # the engine's one-time load is not part of a step: start it first
            extra["engine_load_s"] = start_vllm(cfg)
        train(cfg)
        with open(next(Path(out).rglob("metrics.csv"))) as f:
            rows = [r for r in csv.DictReader(f) if r.get("time/rollout")]
    med = {
        k: statistics.median(float(r[k]) for r in rows)
        for k in ("time/rollout", "time/reward", "time/update")
    }
    return {
        "rollout_s": med["time/rollout"],
        "reward_s": med["time/reward"],
        "update_s": med["time/update"],
        "step_s": sum(med.values()),
        "steps": len(rows),
        "mean_length": statistics.median(float(r["completions/mean_length"]) for r in rows),
        "peak_rss_gb": peak_rss_gb(),
        **{
            k.replace("time/", "") + "_s": statistics.median(float(r[k]) for r in rows)
            for k in ("time/weight_sync", "time/rollout_scoring")
            if engine == "vllm"
        },
        **extra,
    }


def start_vllm(cfg) -> float:
    """Create the process's shared vLLM engine the run's module will use; -> seconds."""
    from grace_lightning.models.backbone import BackboneConfig, convert_gguf
    from grace_lightning.rollout.vllm_engine import shared_llm
    from grace_lightning.schema import VllmConfig, typed

    t0 = time.perf_counter()
    r = cfg.rollout
    vcfg = typed(VllmConfig, r.get("vllm"))
    length = vcfg.max_model_len or (cfg.prompt.max_prompt_tokens + r.max_new_tokens)
    shared_llm(str(convert_gguf(BackboneConfig(**cfg.backbone))), vcfg, length)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- reference
def run_reference(args) -> dict:
    import torch

    from grace_lightning.models.backbone import BackboneConfig, load_backbone
    from grace_lightning.prompts import DEFAULT_SYSTEM_PROMPT, ChatPrompter

    torch.manual_seed(0)
    model, tok = load_backbone(BackboneConfig())
    pr = ChatPrompter(tok, DEFAULT_SYSTEM_PROMPT, args.prompt_tokens)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    r = args.new_tokens
    gen_kwargs = dict(
        max_new_tokens=r, min_new_tokens=r, do_sample=True, temperature=1.0, top_p=1.0, top_k=0
    )
    times: dict[str, list[float]] = {"rollout_s": [], "update_s": []}
    for step in steps_of(load_triplets(args), args.groups):
        policy = pr.encode([t.positive for t in step])
        anchors = pr.encode([t.query for t in step] + [t.negatives[0] for t in step])
        seqs = [p for p in policy for _ in range(args.k)] + anchors
        batch = tok.pad({"input_ids": seqs}, return_tensors="pt", padding_side="left")
        model.eval()
        t0 = time.perf_counter()
        with torch.no_grad(), autocast(args.precision):
            out = model.generate(**batch, **gen_kwargs)
        times["rollout_s"].append(time.perf_counter() - t0)
        n = len(policy) * args.k
        full = out[:n]
        mask = torch.cat([batch["attention_mask"][:n], torch.ones(n, r, dtype=torch.long)], dim=1)
        model.train()
        t0 = time.perf_counter()
        with autocast(args.precision):
            logits = model(input_ids=full, attention_mask=mask).logits[:, -r - 1 : -1].float()
        logp = logits.log_softmax(-1).gather(-1, full[:, -r:, None]).squeeze(-1)
        logp.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times["update_s"].append(time.perf_counter() - t0)
    res = {k: statistics.median(v) for k, v in times.items()}
    res["step_s"] = res["rollout_s"] + res["update_s"]
    res["steps"] = len(times["rollout_s"])
    res["peak_rss_gb"] = peak_rss_gb()
    return res


# ----------------------------------------------------------------------------- TRL
class GraceRewardForTRL:
    """GRACE's supervised reward as a TRL reward function (TRL passes texts, not hidden states).

    For each group of K completions of one positive: re-generate one rationale for its query and
    one for its negative at the anchor temperature (0.5), then re-encode every sequence (policy
    prompt + completion, anchor prompt + rationale) and mean-pool the last hidden states after the
    system prompt, as GRACE does; reward = paper's total (pos + neg + 0.2 cons + 0.2 hard) / 0.1.
    """

    __name__ = "grace"

    def __init__(self, tokenizer, prompter, k: int, new_tokens: int, precision: str):
        self.tokenizer, self.prompter, self.k, self.r = tokenizer, prompter, k, new_tokens
        self.precision = precision  # the reward's own passes run at the trainer's precision
        self.model = None
        self.generate = None  # the model's own generate (not the timed wrapper)
        self.seconds: list[float] = []

    def __call__(self, prompts, completions, completion_ids, query, negative, **kwargs):
        import torch
        import torch.nn.functional as F

        from grace_lightning.embedding import encode_prompts
        from grace_lightning.rl.rewards import supervised_rewards

        t0 = time.perf_counter()
        k, tok, pr = self.k, self.tokenizer, self.prompter
        b = len(completion_ids) // k
        positives = [p[-1]["content"] for p in prompts[::k]]
        anchor_ids = pr.encode(list(query[::k]) + list(negative[::k]))  # (2B) queries, negatives
        was = self.model.training
        self.model.eval()
        with torch.no_grad(), autocast(self.precision):
            batch = tok.pad({"input_ids": anchor_ids}, return_tensors="pt", padding_side="left")
            out = self.generate(
                **batch,
                max_new_tokens=self.r,
                min_new_tokens=self.r,
                do_sample=True,
                temperature=0.5,
                top_p=1.0,
                top_k=0,
            )
            rationales = out[:, batch["input_ids"].size(1) :].tolist()
            policy_ids = pr.encode(positives)
            seqs = [policy_ids[i // k] + list(c) for i, c in enumerate(completion_ids)]
            seqs += [a + g for a, g in zip(anchor_ids, rationales)]
            emb = encode_prompts(
                self.model, seqs, pr.system_len, tok.pad_token_id, batch_size=len(seqs)
            )
            emb = F.normalize(emb.float(), dim=-1)
            policy = emb[: b * k].view(b, k, -1)  # (B, K, D)
            q, neg = emb[b * k : b * k + b], emb[b * k + b :][:, None]  # (B, D), (B, 1, D)
            total = supervised_rewards(q, policy, neg)["total"]  # (B, K) fp32
        self.model.train(was)
        self.seconds.append(time.perf_counter() - t0)
        return total.reshape(-1).tolist()


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grace_lightning.models.backbone import BackboneConfig, load_backbone
    from grace_lightning.prompts import DEFAULT_SYSTEM_PROMPT, ChatPrompter

    torch.manual_seed(0)
    model, tok = load_backbone(BackboneConfig())
    pr = ChatPrompter(tok, DEFAULT_SYSTEM_PROMPT, args.prompt_tokens)
    rows = [
        {
            "prompt": [
                {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                {"role": "user", "content": t.positive},
            ],
            "query": t.query,
            "negative": t.negatives[0],
        }
        for t in load_triplets(args)
    ]
    r, n = args.new_tokens, args.groups * args.k
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"),
        per_device_train_batch_size=n,  # B x K completions per optimiser step
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=args.k,
        max_completion_length=r,
        generation_kwargs={"min_new_tokens": r},  # EOS suppressed: fixed shape, as the others
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        num_iterations=1,
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="none",
        learning_rate=1e-6,
        max_steps=args.repeats,
        shuffle_dataset=False,
        use_cpu=True,
        bf16=args.precision == "bf16",
        fp16=False,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_dropout=True,
        log_completions=False,
        dataloader_num_workers=0,
        seed=0,
    )
    reward = GraceRewardForTRL(tok, pr, args.k, r, args.precision)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t0, self.steps = None, []

        def on_step_begin(self, *a, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **kw):
            self.steps.append(time.perf_counter() - self.t0)

    timer = StepTimer()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[timer],
    )
    inner = trainer.accelerator.unwrap_model(trainer.model)
    reward.model, reward.generate = inner, inner.generate
    gen_seconds: list[float] = []
    prompt_lengths: list[int] = []
    in_generate, autocast_seen = [False], set()

    def autocast_probe(module, inputs):  # is TRL's rollout under autocast? (bf16 runs)
        if in_generate[0]:
            autocast_seen.add(torch.is_autocast_enabled("cpu"))

    inner.get_decoder().layers[0].register_forward_pre_hook(autocast_probe)

    def timed_generate(*a, **kw):  # TRL's rollout: the policy's completions
        if "attention_mask" in kw:
            prompt_lengths.extend(kw["attention_mask"].sum(-1).tolist())
        in_generate[0] = True
        t0 = time.perf_counter()
        try:
            return reward.generate(*a, **kw)
        finally:
            gen_seconds.append(time.perf_counter() - t0)
            in_generate[0] = False

    inner.generate = timed_generate
    trainer.train()
    steps = len(timer.steps)
    if steps != args.repeats or len(gen_seconds) != steps or len(reward.seconds) != steps:
        raise RuntimeError(
            f"TRL: {steps} steps, {len(gen_seconds)} generate calls, {len(reward.seconds)} reward "
            f"calls; expected {args.repeats} of each"
        )
    per_step = [
        {"step_s": s, "rollout_s": g, "reward_s": w, "update_s": s - g - w}
        for s, g, w in zip(timer.steps, gen_seconds, reward.seconds)
    ]
    res = {k: statistics.median(p[k] for p in per_step) for k in per_step[0]}
    res["steps"] = steps
    res["peak_rss_gb"] = peak_rss_gb()
    res["rollout_autocast"] = sorted(autocast_seen)
    if prompt_lengths:
        res["prompt_tokens"] = [min(prompt_lengths), max(prompt_lengths)]
    return res


# ----------------------------------------------------------------------------- parent
def run_part(part: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--part", part, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"error": "\n".join(tail) or f"exit code {proc.returncode}"}
    return json.loads(line[-1][7:])


def prompt_stats(args, tok):
    from grace_lightning.prompts import DEFAULT_SYSTEM_PROMPT, ChatPrompter

    pr = ChatPrompter(tok, DEFAULT_SYSTEM_PROMPT, args.prompt_tokens)
    steps = []
    for step in steps_of(load_triplets(args), args.groups):
        policy = [len(x) for x in pr.encode([t.positive for t in step])]
        anchors = [
            len(x) for x in pr.encode([t.query for t in step] + [t.negatives[0] for t in step])
        ]
        steps.append((policy, anchors))
    return pr, steps


def fmt_stats(xs: list[int]) -> str:
    return f"{min(xs)}-{max(xs)} (mean {statistics.mean(xs):.0f})"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--data", default=str(DEFAULT_DATA), help="triplets JSONL: query, positive, negative"
    )
    p.add_argument("--groups", type=int, default=4, help="triplets (policy prompts) per step")
    p.add_argument("--k", type=int, default=8, help="rollouts per policy prompt")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=1024, help="prompt length limit")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--repeats", type=int, default=1, help="measured steps per column (median)")
    p.add_argument("--peer", choices=("trl", "none"), default="trl")
    p.add_argument("--parts", default=None, help="comma-separated subset of grace,reference,trl")
    p.add_argument(
        "--rollout-engine",
        default="hf",
        help="comma-separated rollout engines of the GRACE column: hf, vllm (docs/vllm.md)",
    )
    p.add_argument("--json", default=None, help="also write all results here")
    p.add_argument("--part", choices=PARTS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.part:
        fn = {
            "grace": run_grace,
            "grace_vllm": lambda a: run_grace(a, "vllm"),
            "reference": run_reference,
            "trl": run_trl,
        }[args.part]
        print("RESULT " + json.dumps(fn(args)))
        return

    import torch
    from transformers import AutoConfig

    from grace_lightning.models.backbone import BackboneConfig, convert_gguf, load_tokenizer

    parts = args.parts.split(",") if args.parts else ["grace", "reference"]
    if not args.parts and args.peer == "trl":
        parts.append("trl")
    engines = args.rollout_engine.split(",")
    if "grace" in parts and engines != ["hf"]:  # one GRACE column per engine, same run
        i = parts.index("grace")
        parts[i : i + 1] = [{"hf": "grace", "vllm": "grace_vllm"}[e] for e in engines]
    cfg = BackboneConfig()
    shape = ModelShape.from_config(AutoConfig.from_pretrained(convert_gguf(cfg)))
    _, steps = prompt_stats(args, load_tokenizer(cfg))
    policy = [x for s in steps for x in s[0]]
    anchors = [x for s in steps for x in s[1]]
    info = cpu_info()
    print(
        f"CPU: {describe_cpu(info)}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"shape: {args.groups} triplets x {args.k} rollouts x {args.new_tokens} new tokens (EOS "
        f"suppressed), precision {args.precision}, {args.repeats} measured step(s) per column, "
        f"no warm-up"
    )
    print(
        f"prompts ({args.data}, first {len(policy)} triplets): policy {fmt_stats(policy)} tokens; "
        f"anchors (query, negative) {fmt_stats(anchors)} tokens"
    )

    # matmul throughput on this machine, now (nothing else of ours runs)
    rows = args.groups * args.k + 2 * args.groups
    mm = matmul_throughput(shape, rows=rows, tokens=args.groups * args.k * args.new_tokens)
    print(
        f"matmul GFLOP/s (decode M={rows}, update M={args.groups * args.k * args.new_tokens}): "
        + "; ".join(
            f"{d}: decode {v['decode']:.0f}, update {v['update']:.0f}, best {v['peak']:.0f}"
            for d, v in mm.items()
        )
    )

    results = {}
    for part in parts:
        if part == "trl":
            try:
                import trl  # noqa: F401
            except ImportError:
                results[part] = {"error": "trl is not installed: pip install -e .[bench]"}
                continue
        t0 = time.perf_counter()
        results[part] = run_part(part, sys.argv[1:])
        results[part]["wall_s"] = time.perf_counter() - t0
        if "error" in results[part]:
            print(f"\n{part} FAILED:\n{results[part]['error']}\n")

    # FLOPs per step (mean over the measured steps' prompts), by the same counter for every column
    counters = {
        "grace": grace_step_flops,
        "grace_vllm": grace_step_flops,  # + a no-grad scoring pass, not counted
        "reference": reference_step_flops,
        "trl": trl_step_flops,
    }
    flops = {}
    for part, fn in counters.items():
        per = [fn(shape, pol, anc, args.k, args.new_tokens) for pol, anc in steps]
        flops[part] = {k: statistics.mean(f[k] for f in per) for k in per[0]}

    cols = [c for c in parts if "error" not in results.get(c, {"error": 1})]
    names = {
        "grace": "GRACE step",
        "grace_vllm": "GRACE vLLM",
        "reference": "bare ref",
        "trl": "TRL 1.16",
    }
    print(f"\n{'':30s}" + "".join(f"{names[c]:>12s}" for c in cols))

    def row(label, fn):
        cells = []
        for c in cols:
            try:
                v = fn(c, results[c])
            except (KeyError, ZeroDivisionError):
                v = None
            cells.append(f"{'-' if v is None else v:>12}")
        print(f"{label:30s}" + "".join(cells))

    row("rollout / generate (s)", lambda c, r: f"{r['rollout_s']:.1f}")
    row("embed + reward (s)", lambda c, r: f"{r['reward_s']:.2f}" if "reward_s" in r else None)
    row("update (s)", lambda c, r: f"{r['update_s']:.1f}")
    row("step (s)", lambda c, r: f"{r['step_s']:.1f}")
    row("  of which weight sync (s)", lambda c, r: f"{r['weight_sync_s']:.1f}")
    row("  of which scoring pass (s)", lambda c, r: f"{r['rollout_scoring_s']:.1f}")
    row("vLLM engine load (s, not in step)", lambda c, r: f"{r['engine_load_s']:.0f}")
    row("peak RSS (GB)", lambda c, r: f"{r['peak_rss_gb']:.2f}")
    row("process wall (s)", lambda c, r: f"{r['wall_s']:.0f}")
    row("rollout TFLOP", lambda c, r: f"{flops[c]['rollout'] / 1e12:.2f}")
    row(
        "reward TFLOP",
        lambda c, r: f"{flops[c]['reward'] / 1e12:.2f}" if "reward" in flops[c] else None,
    )
    row("update TFLOP (fwd+bwd)", lambda c, r: f"{flops[c]['update'] / 1e12:.2f}")
    tput = mm[DTYPE[args.precision]]

    def frac(phase, bound):
        def cell(c, r):
            g = flops[c][phase] / r[f"{phase}_s"] / 1e9
            return f"{g:.0f} ({100 * g / tput[bound]:.0f}%)"

        return cell

    row(f"rollout GFLOP/s (% {args.precision} decode mm)", frac("rollout", "decode"))
    row(f"update GFLOP/s (% {args.precision} update mm)", frac("update", "update"))

    print()
    t = results.get("trl", {})
    if args.precision == "bf16" and "rollout_autocast" in t and t["rollout_autocast"] != [True]:
        print(f"NOTE: TRL's rollout ran with autocast={t['rollout_autocast']} (not all bf16)")
    if "prompt_tokens" in t:
        print(f"TRL's policy prompts: {t['prompt_tokens'][0]}-{t['prompt_tokens'][1]} tokens")
    g = results.get("grace", {})
    for other in ("trl", "reference"):
        o = results.get(other, {})
        if "step_s" in g and "step_s" in o:
            line = f"GRACE step / {names[other]} step = {g['step_s'] / o['step_s']:.2f}x"
            line += f"; peak RSS {g['peak_rss_gb']:.2f} vs {o['peak_rss_gb']:.2f} GB"
            if other == "trl":
                ok = g["step_s"] <= 0.15 * o["step_s"] and g["peak_rss_gb"] < o["peak_rss_gb"]
                line += f" (goal <= 0.15x and less memory: {'met' if ok else 'MISSED'})"
            print(line)
        elif other == "trl":
            print("GRACE / TRL: n/a (TRL column not measured in this run)")
    v = results.get("grace_vllm", {})
    if "rollout_s" in g and "rollout_s" in v:
        speed = g["rollout_s"] / v["rollout_s"]
        print(
            f"rollout: HF engine / vLLM engine = {speed:.2f}x (vLLM incl. weight sync + scoring "
            f"pass; goal >= 2x: {'met' if speed >= 2 else 'MISSED'}); step: "
            f"{g['step_s'] / v['step_s']:.2f}x"
        )
    if "step_s" in v and "step_s" in results.get("trl", {}):
        ratio = v["step_s"] / results["trl"]["step_s"]
        print(
            f"GRACE vLLM step / TRL step = {ratio:.2f}x (goal <= 0.2x: {'met' if ratio <= 0.2 else 'MISSED'})"
        )
    if "step_s" in g:
        for phase, bound in (("rollout", "decode"), ("update", "update")):
            achieved = flops["grace"][phase] / g[f"{phase}_s"] / 1e9
            pct = 100 * achieved / tput[bound]
            print(
                f"GRACE {phase}: {achieved:.0f} GFLOP/s = {pct:.0f}% of the {args.precision} matmul "
                f"throughput measured at its shapes, {100 * achieved / tput['peak']:.0f}% of the "
                f"best shape (goal >= 50%: {'met' if pct >= 50 else 'MISSED'})"
            )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "cpu": info,
                    "matmul_gflops": mm,
                    "flops": flops,
                    "results": results,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
