"""Is bf16 autocast on CPU as good as fp32 for GRACE? Embeddings, log-prob ratios, matmul speed.

    python bench/bf16_quality.py [--texts 32] [--new-tokens 64] [--groups 4] [--k 4]

On the embedded default (SmolLM2-135M-Instruct, real weights), fp32 master weights throughout;
"bf16" = ``torch.autocast("cpu", dtype=torch.bfloat16)``, as ``trainer=cpu_bf16`` runs it.

1. Embeddings, cosine to fp32 (issue: >= 0.999 expected), over ``--texts`` STS12 sentences:
   - base:       prompt pooling (no rationale), bf16 vs fp32;
   - rationale:  the same rationale tokens (sampled once in fp32) pooled under bf16 vs fp32;
   - engine:     the sampler's own pooled embedding under bf16 (its rationale sampled in bf16)
                 vs an fp32 pooling of the very same tokens (what GraceEncoder stores);
   - end to end: bf16 rationale + embedding vs fp32 rationale + embedding (same per-text seeds;
                 differs wherever bf16 logits flip a sampled token), with the share of texts
                 whose rationale is identical; next to it fp32 vs fp32 with other seeds, the
                 spread any other rationale gives (the scale to judge the bf16 row by).
   Seconds per pass are printed for scale only (timed once, no warm-up): use bench/encode.py.
2. Sampled vs loss-pass log-probs (the PPO ratio at the first mini-batch, which should be 1):
   bench triplets' policy prompts x K rollouts, the engine's recorded log-probs vs
   ``response_logprobs`` of the same tokens; mean and max of |exp(logp_loss - logp_sampled) - 1|
   over response tokens, fp32/fp32, bf16/bf16, and fp32 loss pass vs bf16 sampling.
3. ``torch.matmul`` GFLOP/s in fp32 and bf16 on the model's shapes (this process's threads).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import ModelShape, describe_cpu, matmul_throughput  # noqa: E402

from grace_lightning.embedding import encode_prompts  # noqa: E402
from grace_lightning.models.backbone import BackboneConfig, load_backbone  # noqa: E402
from grace_lightning.prompts import ChatPrompter  # noqa: E402
from grace_lightning.rl.policy import response_logprobs  # noqa: E402
from grace_lightning.rollout.engine import HFRolloutEngine, text_seed  # noqa: E402

DATA = Path(os.environ.get("GRACE_DATA_ROOT", ROOT.parent / "shared" / "data"))


def precision(name: str):
    if name == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sentences(n: int) -> list[str]:
    with open(DATA / "sts12" / "test.jsonl") as f:
        return list(dict.fromkeys(json.loads(line)["sentence1"] for line in f))[:n]


def cos_stats(a: torch.Tensor, b: torch.Tensor) -> str:
    c = F.cosine_similarity(a.float(), b.float(), dim=-1)
    return f"mean {c.mean():.5f}, min {c.min():.5f}"


def ratio_stats(loss: torch.Tensor, sampled: torch.Tensor, mask: torch.Tensor) -> str:
    dev = ((loss - sampled).exp() - 1).abs()[mask.bool()]
    return f"mean {dev.mean():.2e}, max {dev.max():.2e}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--texts", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--groups", type=int, default=4, help="bench triplets for the ratio check")
    p.add_argument("--k", type=int, default=4, help="rollouts per triplet for the ratio check")
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = load_backbone(BackboneConfig())
    model.eval()
    shape = ModelShape.from_hf_config(model.config)
    pr = ChatPrompter(tok)
    r, pad, sl = args.new_tokens, tok.pad_token_id, pr.system_len
    engine = HFRolloutEngine(model, tok, max_new_tokens=r)
    print(f"CPU: {describe_cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("SmolLM2-135M-Instruct, fp32 weights; bf16 = torch.autocast('cpu', bfloat16)\n")

    # 1. embeddings
    texts = sentences(args.texts)
    ids = pr.encode(texts)
    seeds = [text_seed(0, t) for t in texts]
    out, seconds = {}, {}
    for name in ("fp32", "bf16"):
        with precision(name):
            t0 = time.perf_counter()
            out[name, "base"] = encode_prompts(model, ids, sl, pad, batch_size=len(ids))
            seconds[name, "base"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            ro = engine.generate(ids, 1, 1.0, sl, seeds=seeds)
            seconds[name, "rationale"] = time.perf_counter() - t0
        out[name, "engine"] = ro.pooled
        out[name, "tokens"] = [
            row[m.bool()].tolist() for row, m in zip(ro.response_ids, ro.response_mask)
        ]
    # natural spread of end-to-end embeddings: fp32 again with other per-text seeds
    other = engine.generate(ids, 1, 1.0, sl, seeds=[text_seed(1, t) for t in texts]).pooled
    # the fp32 rationale's tokens, pooled under each precision
    seqs = [a + b for a, b in zip(ids, out["fp32", "tokens"])]
    seqs_bf16 = [a + b for a, b in zip(ids, out["bf16", "tokens"])]
    for name in ("fp32", "bf16"):
        with precision(name):
            out[name, "pooled"] = encode_prompts(model, seqs, sl, pad, batch_size=len(seqs))
    fp32_of_bf16_tokens = encode_prompts(model, seqs_bf16, sl, pad, batch_size=len(seqs))
    same = sum(a == b for a, b in zip(out["fp32", "tokens"], out["bf16", "tokens"]))
    print(f"1. embeddings, cosine bf16 vs fp32 ({len(texts)} STS12 sentences, {r} new tokens):")
    print(
        f"   base (prompt pooling):                 {cos_stats(out['bf16', 'base'], out['fp32', 'base'])}"
    )
    print(
        f"   rationale, same tokens, pooled:        {cos_stats(out['bf16', 'pooled'], out['fp32', 'pooled'])}"
    )
    print(
        f"   engine's bf16 pooling vs fp32 pooling: {cos_stats(out['bf16', 'engine'], fp32_of_bf16_tokens)}"
    )
    print(
        f"   engine's fp32 pooling vs fp32 pooling: {cos_stats(out['fp32', 'engine'], out['fp32', 'pooled'])}  (sanity)"
    )
    print(
        f"   end to end (own rationales):           {cos_stats(out['bf16', 'engine'], out['fp32', 'engine'])}"
        f"; identical rationales {same}/{len(texts)}"
    )
    print(
        f"   fp32 vs fp32 with other seeds:         {cos_stats(other, out['fp32', 'engine'])}"
        "  (the spread a different rationale gives)"
    )
    print(
        "   seconds fp32 / bf16: base {:.2f} / {:.2f}, rationale {:.1f} / {:.1f}\n".format(
            seconds["fp32", "base"],
            seconds["bf16", "base"],
            seconds["fp32", "rationale"],
            seconds["bf16", "rationale"],
        )
    )

    # 2. sampled vs loss-pass log-probs
    from grace_lightning.data.readers import read_triplets

    triplets, _ = read_triplets(
        DATA / "bench_triplets" / "triplets.jsonl", max_examples=args.groups
    )
    pids = pr.encode([t.positive for t in triplets])
    seeds = [text_seed(1, t.positive) for t in triplets]
    print(
        f"2. |exp(logp_loss - logp_sampled) - 1| over response tokens "
        f"({len(pids)} bench triplets x {args.k} rollouts x {r} tokens, T=1.0):"
    )
    for sample_p, loss_p in (("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32")):
        with precision(sample_p):
            ro = engine.generate(pids, args.k, 1.0, sl, seeds=seeds)
        with precision(loss_p), torch.no_grad():
            logp, _ = response_logprobs(
                model,
                ro.prompt_ids,
                ro.prompt_mask,
                ro.response_ids,
                ro.response_mask,
                ro.row_to_prompt,
                ro.temperatures,
            )
        print(
            f"   sampled {sample_p}, loss pass {loss_p}: {ratio_stats(logp, ro.logprobs, ro.response_mask)}"
        )

    # 3. matmul
    mm = matmul_throughput(shape, rows=args.groups * args.k, tokens=args.groups * args.k * r)
    print(
        f"\n3. matmul GFLOP/s (decode M={args.groups * args.k}, update M={args.groups * args.k * r}):"
    )
    for d, v in mm.items():
        print(
            f"   {d:9s} decode {v['decode']:7.0f}  update {v['update']:7.0f}  best {v['peak']:7.0f}"
        )
    f, b = mm["float32"], mm["bfloat16"]
    print(
        f"   bf16 / fp32: decode {b['decode'] / f['decode']:.1f}x, update {b['update'] / f['update']:.1f}x"
    )


if __name__ == "__main__":
    main()
