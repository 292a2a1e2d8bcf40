"""Predicted peak memory per GPU of the contrastive baselines at paper scale (docs/scale.md).

``python train.py backbone=<b> method=infonce`` (experiment=paper_infonce) embeds every text of a
batch in one forward: 64 triplets = 192 texts on one GPU, left-padded to the longest. The startup
check predicts that step with `grace_lightning.scale.predict_contrastive_peak` (the GRACE loss
pass's layer model on full sequences, no LM head). This prints it for the four paper backbones:
the preset (texts cut to 256 tokens), LLM2Vec's 512 on one GPU, and 512 with FSDP over 4 GPUs.

    python bench/contrastive_memory.py            # GiB per GPU; usable: 74 of an 80 GB GPU
    python bench/contrastive_memory.py --measure  # one step on this CPU vs the model (~2 min)

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


def measure(texts: int = 24, text_len: int = 352, layers: int = 2, gc: bool = True) -> dict:
    """One contrastive forward + backward on this CPU: measured bytes above the step's start
    (weights and AdamW state already there) vs `predict_contrastive_peak`'s update parts."""
    import torch

    from bench.paper_scale import PhasePeaks, build_model
    from grace_lightning.contrastive import info_nce
    from grace_lightning.embedding import masked_mean_pool
    from grace_lightning.rollout.padding import pooling_mask, positions_from_mask

    torch.manual_seed(0)
    shape = scale.SHAPES["qwen"]
    model = build_model(shape, layers)
    model.config.use_cache = False
    if gc:
        model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ids = torch.randint(100, shape.vocab, (texts, text_len))
    mask = torch.ones_like(ids)
    b = texts // 3
    peaks = PhasePeaks()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.get_decoder()(
                input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)
            ).last_hidden_state  # (N, T, D)
            emb = masked_mean_pool(hidden, pooling_mask(mask, 16))  # (N, D) fp32
        loss, _ = info_nce(emb[:b], emb[b:], 0.05)
        loss.backward()

    for _ in range(2):  # the first step creates AdamW's state; the second is measured
        opt.zero_grad(set_to_none=True)
        peaks.enter("update")
        step()
        peaks.exit()
        opt.step()
    st = scale.Setting(gc=gc)
    want = scale.predict_contrastive_peak(shape, st, texts, text_len, layers=layers)
    predicted = sum(want["update"].values())  # the update phase above the static memory
    return {
        "texts": texts,
        "text_len": text_len,
        "layers": layers,
        "gc": gc,
        "measured_bytes": peaks.peak["update"],
        "predicted_bytes": predicted,
        "parts": want["update"],
    }


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--measure", action="store_true", help="one step on this CPU vs the model")
    args = parser.parse_args()
    if args.measure:
        from bench._common import cpu_info

        info = cpu_info()
        print(f"CPU: {info.get('model')}, {info['cores']} cores")
        for gc in (True, False):
            r = measure(gc=gc)
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
