"""Predicted peak memory per GPU of the contrastive baselines at paper scale (docs/scale.md).

``python train.py backbone=<b> method=infonce`` (experiment=paper_infonce) embeds every text of a
batch in one forward: 64 triplets = 192 texts on one GPU, left-padded to the longest. The startup
check predicts that step with `grace_lightning.scale.predict_contrastive_peak` (the GRACE loss
pass's layer model on full sequences, no LM head). This prints it for the four paper backbones:
the preset (texts cut to 256 tokens), LLM2Vec's 512 on one GPU, and 512 with FSDP over 4 GPUs.

    python bench/contrastive_memory.py            # GiB per GPU; usable: 74 of an 80 GB GPU
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


def main() -> None:
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
