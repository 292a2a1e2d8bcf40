"""Evaluation throughput: texts/s and rationale tokens/s, base and rationale mode, fp32 and bf16,
with and without the shared system-prompt prefix, at several batch sizes.

    python bench/encode.py [--texts 64] [--new-tokens 64] [--batch-sizes 8,32,64]
                           [--precisions fp32,bf16] [--device cpu|cuda] [--texts-file F]

Texts: short STS-B sentences (``../shared/data/stsb/train.jsonl``, as a user encoding STS-B would),
else STS12, else synthetic; length-sorted into batches as ``GraceEncoder`` does. Every rationale
runs exactly ``--new-tokens`` tokens (EOS ignored) so every row does the same work.

- base:      ``embedding.encode_prompts`` (prompt pooling, no rationale): texts/s;
- rationale: ``HFRolloutEngine.generate`` with per-text seeds, embeddings pooled in the sampling
             pass (what ``GraceEncoder`` runs in rationale mode): texts/s and generated tokens/s;
- prefix:    ``share_prefix=True`` runs the system prompt + chat header (~40 tokens, most of a
             short sentence's prompt) once and reuses its KV for every text; ``False`` runs it for
             every text. Printed ``n/a`` when the installed engine has no such knob;
- bf16:      ``torch.autocast(<device>, bfloat16)`` over the fp32 weights (``trainer=cpu_bf16``'s
             numerics).

For each (mode, precision, prefix) the fastest batch size is printed with its numbers; the whole
grid goes to ``--json``. Then ``GraceEncoder.encode`` (rationale mode, cold cache, then the
same call from the cache) at the fastest fp32 batch size: the user-facing number.

Finally the Hub user's path next to it (``--st-modes``, ``--st-batch``): the model is exported
(``save_policy``: weights, tokenizer, the self-contained ``grace_embedding.py``), then the same
export, in the same process, on the same texts, is encoded by ``GraceEncoder.from_run_dir`` and by
``SentenceTransformer(export, trust_remote_code=True)`` (``precision`` as a model kwarg; the
encoder under bf16 autocast, as ``eval.py precision=bf16``), no rationale cache; each timed
``--st-repeats`` times alternately, best kept; the vectors of the two are compared too.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import describe_cpu  # noqa: E402

from grace_lightning.embedding import encode_prompts  # noqa: E402
from grace_lightning.eval.encoder import GraceEncoder  # noqa: E402
from grace_lightning.models.backbone import BackboneConfig, load_backbone  # noqa: E402
from grace_lightning.prompts import DEFAULT_SYSTEM_PROMPT, ChatPrompter  # noqa: E402
from grace_lightning.rollout.engine import HFRolloutEngine, text_seed  # noqa: E402

DATA = Path(os.environ.get("GRACE_DATA_ROOT", ROOT.parent / "shared" / "data"))


def load_texts(n: int, path: str | None) -> list[str]:
    if path:
        return Path(path).read_text().splitlines()[:n]
    for name in ("stsb/train.jsonl", "sts12/test.jsonl"):
        if (DATA / name).exists():
            with open(DATA / name) as f:
                return list(dict.fromkeys(json.loads(line)["sentence1"] for line in f))[:n]
    return [f"Sentence {i} is about topic {i % 13} and a few other things." for i in range(n)]


def has_knob(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def precision_ctx(name: str, device: str):
    if name == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--texts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", default="8,32,64")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--texts-file", default=None, help="one text a line")
    p.add_argument("--skip-encoder", action="store_true", help="no GraceEncoder end-to-end row")
    p.add_argument("--json", default=None, help="also write the grid here")
    p.add_argument(
        "--st-modes", default="base", help="modes for the ST-module rows ('' to skip them)"
    )
    p.add_argument("--st-batch", type=int, default=32, help="batch size of the ST-module rows")
    p.add_argument("--st-repeats", type=int, default=2)
    p.add_argument("--st-only", action="store_true", help="only the GraceEncoder vs ST-module rows")
    args = p.parse_args()
    dev, r = args.device, args.new_tokens
    model, tok = load_backbone(BackboneConfig(), device=dev)
    model.eval()
    texts = load_texts(args.texts, args.texts_file)
    if args.st_only:
        rows = bench_st_module(model, tok, texts, args, dev)
        if args.json:
            Path(args.json).write_text(json.dumps({"st_module": rows, "new_tokens": r}, indent=1))
        return
    pr = ChatPrompter(tok)
    ordered = sorted(pr.encode(texts), key=len, reverse=True)  # as GraceEncoder batches them
    seeds = [text_seed(0, t) for t in texts]  # any fixed per-text seeds: same work per row
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    engine_knob = has_knob(HFRolloutEngine.__init__, "share_prefix")
    base_knob = has_knob(encode_prompts, "share_prefix")
    lengths = [len(x) for x in ordered]
    name = describe_cpu() if dev == "cpu" else torch.cuda.get_device_name(0)
    print(f"device: {name}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"SmolLM2-135M-Instruct (fp32 weights), {len(texts)} texts, prompts {min(lengths)}-"
        f"{max(lengths)} tokens (system prompt + chat header: {pr.system_len}), rationales "
        f"{r} tokens (EOS ignored), batch sizes {sizes}\n"
    )

    def run_base(bs: int, share: bool):
        kw = {"share_prefix": share} if base_knob else {}
        for i in range(0, len(ordered), bs):
            encode_prompts(model, ordered[i : i + bs], pr.system_len, tok.pad_token_id, bs, **kw)

    def run_rationale(bs: int, share: bool):
        kw = {"share_prefix": share} if engine_knob else {}
        engine = HFRolloutEngine(model, tok, max_new_tokens=r, ignore_eos=True, **kw)
        for i in range(0, len(ordered), bs):
            engine.generate(ordered[i : i + bs], 1, 1.0, pr.system_len, seeds=seeds[i : i + bs])

    # warm-up: kernels, allocator, autocast caches
    for prec in args.precisions.split(","):
        with precision_ctx(prec, dev):
            run_base(min(sizes), True)
            HFRolloutEngine(model, tok, max_new_tokens=2, ignore_eos=True).generate(
                ordered[:4], 1, 1.0, pr.system_len, seeds=seeds[:4]
            )

    grid = []
    for prec in args.precisions.split(","):
        for mode, fn, knob in (
            ("base", run_base, base_knob),
            ("rationale", run_rationale, engine_knob),
        ):
            for share in (False, True):
                if share and not knob:
                    continue  # without the knob there is one path (printed as "no prefix")
                for bs in sizes:
                    with precision_ctx(prec, dev):
                        sec = timed(lambda: fn(bs, share), dev)  # noqa: B023
                    grid.append(
                        {
                            "mode": mode,
                            "precision": prec,
                            "share_prefix": share,
                            "batch": bs,
                            "seconds": sec,
                            "texts_per_s": len(texts) / sec,
                            "tokens_per_s": len(texts) * r / sec if mode == "rationale" else None,
                        }
                    )

    print(
        "| mode | precision | shared prefix | best batch | seconds | texts/s | rationale tok/s | speed-up from prefix |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    best = {}
    for mode in ("base", "rationale"):
        for prec in args.precisions.split(","):
            for share in (False, True):
                rows = [
                    g
                    for g in grid
                    if (g["mode"], g["precision"], g["share_prefix"]) == (mode, prec, share)
                ]
                knob = base_knob if mode == "base" else engine_knob
                if not rows:
                    print(f"| {mode} | {prec} | n/a | | | | | |")
                    continue
                b = min(rows, key=lambda g: g["seconds"])
                best[mode, prec, share] = b
                tps = f"{b['tokens_per_s']:,.0f}" if b["tokens_per_s"] else ""
                gain = ""
                if share and (mode, prec, False) in best:
                    gain = f"{best[mode, prec, False]['seconds'] / b['seconds']:.2f}x"
                label = ("yes" if share else "no") if knob else "n/a (no knob)"
                print(
                    f"| {mode} | {prec} | {label} | {b['batch']} | {b['seconds']:.2f} | {b['texts_per_s']:,.1f} | {tps} | {gain} |"
                )
    for mode in ("base", "rationale"):
        for share in (False, True):
            f, h = best.get((mode, "fp32", share)), best.get((mode, "bf16", share))
            if f and h:
                print(
                    f"{mode}, prefix {'shared' if share else 'not shared'}: bf16 {f['seconds'] / h['seconds']:.2f}x the speed of fp32"
                )

    if not args.skip_encoder:
        bs = min(
            (g for g in grid if g["mode"] == "rationale" and g["precision"] == "fp32"),
            key=lambda g: g["seconds"],
        )["batch"]
        gen = {"max_new_tokens": r, "ignore_eos": True}
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "rationales.sqlite"
            cold = GraceEncoder(model, tok, mode="rationale", generation=gen, cache=cache)
            fp = cold.fingerprint  # weights hash, once per checkpoint: not part of the timing
            t_cold = timed(lambda: cold.encode(texts, batch_size=bs, show_progress_bar=False), dev)
            hot = GraceEncoder(
                model, tok, mode="rationale", generation=gen, cache=cache, fingerprint=fp
            )
            t_hot = timed(lambda: hot.encode(texts, batch_size=bs, show_progress_bar=False), dev)
            assert hot.stats["generated"] == 0, hot.stats
        print(
            f"\nGraceEncoder.encode (rationale, fp32, batch {bs}): cold {t_cold:.2f} s "
            f"({len(texts) / t_cold:,.1f} texts/s, {len(texts) * r / t_cold:,.0f} tok/s); from the "
            f"cache {t_hot:.3f} s ({t_cold / t_hot:,.0f}x faster)"
        )
    st_rows = []
    if args.st_modes:
        st_rows = bench_st_module(model, tok, texts, args, dev)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"grid": grid, "st_module": st_rows, "texts": len(texts), "new_tokens": r},
                indent=1,
            )
        )


def bench_st_module(model, tok, texts, args, dev) -> list[dict]:
    """GraceEncoder vs the exported sentence-transformers module: same export, process, texts."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from grace_lightning.eval.distributed import with_autocast
    from grace_lightning.export import save_policy

    bs, r = args.st_batch, args.new_tokens
    rows = []
    print(
        f"\nSame export, {len(texts)} texts, batch {bs}: GraceEncoder vs SentenceTransformer("
        f"export, trust_remote_code=True) (rationales {r} tokens, EOS ignored, no cache)"
    )
    print(
        "| mode | precision | GraceEncoder texts/s | ST module texts/s | ST / GraceEncoder "
        "| max abs diff |"
    )
    print("|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        meta = {  # what GraceModule.export writes: the training system prompt included
            "system_prompt": DEFAULT_SYSTEM_PROMPT,
            "max_prompt_tokens": 1024,
            "backbone": "smollm2",
            "rollout": {"max_new_tokens": r},
        }
        export = save_policy(model, tok, Path(tmp) / "run" / "export", meta, False)
        gen = {"max_new_tokens": r, "ignore_eos": True}
        for prec in args.precisions.split(","):
            enc = GraceEncoder.from_run_dir(export, device=dev, generation=gen)
            encode = with_autocast(enc, prec)
            st = SentenceTransformer(
                str(export),
                trust_remote_code=True,
                device=dev,
                model_kwargs={"precision": prec, **gen},
            )
            for mode in args.st_modes.split(","):
                kw = {"batch_size": bs, "show_progress_bar": False, "mode": mode}
                t_enc, t_st, out = [], [], {}
                for _ in range(args.st_repeats):  # alternately: both see the same machine load
                    t_enc.append(timed(lambda: out.update(enc=encode(texts, **kw)), dev))  # noqa: B023
                    t_st.append(timed(lambda: out.update(st=st.encode(texts, **kw)), dev))  # noqa: B023
                diff = float(np.abs(out["enc"] - out["st"]).max())  # the same vectors?
                row = {
                    "mode": mode,
                    "precision": prec,
                    "batch": bs,
                    "grace_encoder_texts_per_s": len(texts) / min(t_enc),
                    "st_module_texts_per_s": len(texts) / min(t_st),
                    "max_abs_diff": diff,
                }
                rows.append(row)
                print(
                    f"| {mode} | {prec} | {row['grace_encoder_texts_per_s']:,.1f} | "
                    f"{row['st_module_texts_per_s']:,.1f} | {min(t_enc) / min(t_st):.2f}x | "
                    f"{diff:.1e} |"
                )
    return rows


if __name__ == "__main__":
    main()
