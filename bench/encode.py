"""Throughput of GraceEncoder's rationale mode on the embedded default, next to a bare reference.

    python bench/encode.py [--texts 64] [--new-tokens 64] [--batch-size 16] [--device cpu|cuda]

Same shape on every row: the same texts (STS12 sentences from ../shared/data, else synthetic),
length-sorted into the same batches, every response exactly ``--new-tokens`` long (EOS ignored).
- generate:   bare ``model.generate`` (sampling, T=1, top_p=1), no pooling, no cache;
- engine:     the sampler alone (``HFRolloutEngine``, one shared generator, embeddings pooled in
              the sampling pass), for reference;
- rationale:  ``GraceEncoder.encode`` in rationale mode, cold cache (the engine with per-text
              seeds, decoding, storing in the SQLite cache). Goal: <= 1.2x generate;
- cached:     the same call again from a fresh encoder on the same cache. Goal: >= 20x faster
              than the cold pass;
- base:       base mode (no rationale), for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grace_lightning.eval.encoder import GraceEncoder  # noqa: E402
from grace_lightning.models.backbone import (  # noqa: E402
    BackboneConfig,
    load_backbone,
    prepare_tokenizer,
    torch_dtype,
)
from grace_lightning.prompts import ChatPrompter  # noqa: E402
from grace_lightning.rollout.engine import HFRolloutEngine, left_pad  # noqa: E402


def load_texts(n: int, path: str | None) -> list[str]:
    """``--texts-file`` (one text a line), else STS12 sentences, else synthetic sentences."""
    if path:
        return Path(path).read_text().splitlines()[:n]
    root = Path(os.environ.get("GRACE_DATA_ROOT", ROOT.parent / "shared" / "data"))
    sts12 = root / "sts12" / "test.jsonl"
    if sts12.exists():
        with open(sts12) as f:
            return list(dict.fromkeys(json.loads(line)["sentence1"] for line in f))[:n]
    return [f"Sentence {i} is about topic {i % 13} and a few other things." for i in range(n)]


def load_model(args, dtype: str):
    """The embedded default, or (``--random-weights``) its architecture with random weights from
    ``--model-dir`` (config + tokenizer only: for machines the weights cannot travel to; with
    EOS ignored, speed does not depend on the weights)."""
    if not args.random_weights:
        return load_backbone(BackboneConfig(dtype=dtype), device=args.device)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(args.model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype)).to(args.device)
    return model, prepare_tokenizer(AutoTokenizer.from_pretrained(args.model_dir))


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def batches(prompt_ids: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    ordered = sorted(prompt_ids, key=len, reverse=True)  # as GraceEncoder does
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--texts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--texts-file", default=None, help="one text a line")
    p.add_argument("--random-weights", action="store_true", help="see load_model")
    p.add_argument("--model-dir", default=None, help="config + tokenizer for --random-weights")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    model, tok = load_model(args, dtype)
    model.eval()
    texts = load_texts(args.texts, args.texts_file)
    n, r, bs = len(texts), args.new_tokens, args.batch_size
    prompter = ChatPrompter(tok)
    prompt_ids = prompter.encode(texts)
    groups = batches(prompt_ids, bs)

    @torch.no_grad()
    def bare_generate():
        for group in groups:
            ids, mask = left_pad(group, tok.pad_token_id, args.device)
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=r,
                min_new_tokens=r,
                pad_token_id=tok.pad_token_id,
            )

    engine = HFRolloutEngine(model, tok, max_new_tokens=r, ignore_eos=True)

    def engine_generate():
        g = torch.Generator().manual_seed(0)  # the engine draws its uniforms on the CPU
        for group in groups:
            engine.generate(group, 1, 1.0, prompter.system_len, generator=g)

    gen = {"max_new_tokens": r, "temperature": 1.0, "ignore_eos": True}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "rationales.sqlite"

        def encoder(mode: str) -> GraceEncoder:
            return GraceEncoder(model, tok, mode=mode, generation=gen, cache=cache, name="bench")

        cold = encoder("rationale")
        fp = cold.fingerprint  # weights hash: once per checkpoint (memoised per model dir)
        # warm-up (kernels, allocator) on one short batch of each kind
        warm = GraceEncoder(model, tok, mode="rationale", generation={**gen, "max_new_tokens": 4})
        warm.encode(texts[:bs], batch_size=bs, show_progress_bar=False)
        ids, mask = left_pad(groups[0], tok.pad_token_id, args.device)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=True)

        times = {
            "generate": timed(bare_generate, args.device),
            "engine": timed(engine_generate, args.device),
            "rationale": timed(
                lambda: cold.encode(texts, batch_size=bs, show_progress_bar=False), args.device
            ),
        }
        hot = encoder("rationale")
        hot._fingerprint = fp
        times["cached"] = timed(
            lambda: hot.encode(texts, batch_size=bs, show_progress_bar=False), args.device
        )
        assert hot.stats["generated"] == 0, hot.stats
        times["base"] = timed(
            lambda: encoder("base").encode(texts, batch_size=bs, show_progress_bar=False),
            args.device,
        )

    name = "cpu" if args.device == "cpu" else torch.cuda.get_device_name(0)
    weights = ", random weights" if args.random_weights else ""
    print(
        f"\nSmolLM2-135M-Instruct ({dtype}, {name}{weights}), {n} texts, {r} new tokens each, "
        f"batch {bs}, prompts {min(map(len, prompt_ids))}-{max(map(len, prompt_ids))} tokens\n"
    )
    print("| pass | seconds | texts/s | generated tok/s | vs generate |")
    print("|---|---:|---:|---:|---:|")
    for key, sec in times.items():
        tps = "" if key in ("cached", "base") else f"{n * r / sec:,.0f}"
        print(f"| {key} | {sec:.2f} | {n / sec:,.1f} | {tps} | {sec / times['generate']:.2f}x |")
    ratio = times["rationale"] / times["generate"]
    speedup = times["rationale"] / times["cached"]
    print(
        f"\nrationale / generate = {ratio:.2f}x (goal <= 1.2x: {'met' if ratio <= 1.2 else 'MISSED'});"
        f" cached pass {speedup:,.0f}x faster than cold (goal >= 20x: "
        f"{'met' if speedup >= 20 else 'MISSED'})"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"times": times, "texts": n, "new_tokens": r, "device": name, "dtype": dtype}
            )
        )


if __name__ == "__main__":
    main()
