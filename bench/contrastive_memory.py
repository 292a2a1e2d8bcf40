"""Predicted peak memory per GPU of the contrastive baselines at paper scale (docs/scale.md).

``python train.py backbone=<b> method=infonce`` (experiment=paper_infonce) embeds every text of a
batch in one forward: 64 triplets = 192 texts on one GPU, left-padded to the longest. The startup
check predicts that step with `grace_lightning.scale.predict_contrastive_peak` (the GRACE loss
pass's layer model on full sequences, no LM head). This prints it for the four paper backbones:
the preset (texts cut to 256 tokens), LLM2Vec's 512 on one GPU, and 512 with FSDP over 4 GPUs.

    python bench/contrastive_memory.py            # GiB per GPU; usable: 74 of an 80 GB GPU
    python bench/contrastive_memory.py --measure  # one step on this CPU vs the model (~2 min)
    python bench/contrastive_memory.py --measure --device cuda   # paper_infonce's batch, 28 layers

``--measure`` runs ContrastiveModule's step (the decoder over every text, mean pooling after the
system prompt, InfoNCE, backward) under bf16 autocast on a random-init model of Qwen2.5-1.5B's
real width and vocabulary at reduced depth, and compares the RSS high-water mark of the forward +
backward (bench/paper_scale.py's `PhasePeaks`) with the model's update phase at that depth.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from grace_lightning import scale
from grace_lightning.presets import PAPER_BACKBONES, resolve_overrides

CONF = str(Path(__file__).resolve().parents[1] / "conf")
SETTINGS = {  # column -> (overrides, world size)
    "preset (256 tokens), 1 GPU": ([], 1),
    "512 tokens, 1 GPU": (["model.max_text_tokens=512"], 1),
    "512 tokens, FSDP x4": (["model.max_text_tokens=512", "trainer=fsdp", "trainer.devices=4"], 4),
}


def table(method: str = "infonce") -> dict[str, dict[str, float]]:
    """{backbone: {column: GiB per GPU}} of ``method``'s paper preset."""
    out: dict[str, dict[str, float]] = {}
    with initialize_config_dir(CONF, version_base="1.3"):
        for backbone in PAPER_BACKBONES:
            for column, (extra, world) in SETTINGS.items():
                args = resolve_overrides([f"backbone={backbone}", f"method={method}", *extra])
                cfg = compose("train", overrides=args)
                peak = scale.predict_config_peak(cfg, world) / scale.GIB
                out.setdefault(backbone, {})[column] = peak
    return out


def measure(
    texts: int = 24, text_len: int = 352, layers: int = 2, gc: bool = True, device: str = "cpu"
) -> dict:
    """One contrastive forward + backward (the second step: AdamW's state exists): bytes above
    the step's start vs `predict_contrastive_peak`'s update parts at ``layers`` layers. CPU: the
    RSS high-water mark (`PhasePeaks`); CUDA: ``torch.cuda.max_memory_allocated``."""
    import torch

    from bench.paper_scale import PhasePeaks, build_model
    from grace_lightning.contrastive import info_nce
    from grace_lightning.embedding import masked_mean_pool
    from grace_lightning.rollout.padding import pooling_mask, positions_from_mask

    torch.manual_seed(0)
    shape = scale.SHAPES["qwen"]
    model = build_model(shape, layers).to(device)
    model.config.use_cache = False
    if gc:
        model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ids = torch.randint(100, shape.vocab, (texts, text_len), device=device)
    mask = torch.ones_like(ids)
    b = texts // 3
    peaks = PhasePeaks()
    cuda = device.startswith("cuda")

    def step() -> None:
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            hidden = model.get_decoder()(
                input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)
            ).last_hidden_state  # (N, T, D)
            emb = masked_mean_pool(hidden, pooling_mask(mask, 16))  # (N, D) fp32
        loss, _ = info_nce(emb[:b], emb[b:], 0.05)
        loss.backward()

    measured = 0
    for _ in range(2):  # the first step creates AdamW's state; the second is measured
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            measured = torch.cuda.max_memory_allocated() - start
        else:
            peaks.enter("update")
            step()
            peaks.exit()
            measured = peaks.peak["update"]
        opt.step()
    st = scale.Setting(gc=gc)
    want = scale.predict_contrastive_peak(shape, st, texts, text_len, layers=layers)
    return {
        "texts": texts,
        "text_len": text_len,
        "layers": layers,
        "gc": gc,
        "device": device,
        "measured_bytes": measured,
        "predicted_bytes": sum(want["update"].values()),  # the update phase above the static
        "parts": want["update"],
    }


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--measure", action="store_true", help="one step vs the model")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (bench/gpu_checks.sh)")
    parser.add_argument("--layers", type=int, help="default: 2 on cpu, all 28 on cuda")
    parser.add_argument("--texts", type=int, help="default: 24 on cpu, 192 (64 triplets) on cuda")
    parser.add_argument("--text-len", type=int, default=352, help="paper_infonce's 256 + 96")
    args = parser.parse_args()
    if args.measure:
        import torch

        from bench._common import cpu_info

        cuda = args.device.startswith("cuda")
        info = cpu_info()
        where = torch.cuda.get_device_name() if cuda else f"{info.get('model')}, {info['cores']}"
        print(f"device: {where}{'' if cuda else ' cores'}")
        layers = args.layers or (scale.SHAPES["qwen"].layers if cuda else 2)
        texts = args.texts or (192 if cuda else 24)
        for gc in (True,) if cuda else (True, False):  # 28 layers without GC: ~230 GB
            r = measure(texts, args.text_len, layers, gc, args.device)
            m, w = r["measured_bytes"] / scale.GIB, r["predicted_bytes"] / scale.GIB
            print(
                f"{r['texts']} texts x {r['text_len']} tokens, Qwen2.5-1.5B width, "
                f"{r['layers']} layers, GC {'on' if gc else 'off'}: forward + backward "
                f"measured {m:.2f} GiB, model {w:.2f} GiB ({m / w:.2f}x)"
            )
        return
    rows = table()
    usable = scale.usable_memory(79.6 * scale.GIB) / scale.GIB
    print(f"InfoNCE (paper_infonce), predicted peak GiB per GPU; usable {usable:.0f} of 79.6")
    print("| backbone | " + " | ".join(SETTINGS) + " |")
    print("|---|" + "---:|" * len(SETTINGS))
    for backbone, cols in rows.items():
        cells = [f"{v:.1f}" + ("" if v <= usable else " (no)") for v in cols.values()]
        print(f"| {backbone} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
