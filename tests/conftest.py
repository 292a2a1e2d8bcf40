from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("GRACE_DATA_ROOT", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def tiny_backbone():
    """(model, tokenizer) of the tiny random Llama; session-scoped, do not mutate weights."""
    from grace_lightning.models.backbone import BackboneConfig, load_backbone

    model, tok = load_backbone(BackboneConfig(name="tiny", source="tiny"))
    return model.eval(), tok


@pytest.fixture(scope="session")
def smollm2_backbone():
    from grace_lightning.models.backbone import BackboneConfig, load_backbone

    model, tok = load_backbone(BackboneConfig())
    return model.eval(), tok
