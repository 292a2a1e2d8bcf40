"""Two-stage recipe (conf/experiment/two_stage_*.yaml): GRACE from a contrastive run's export."""

from __future__ import annotations

import hydra
import pytest
import torch
from omegaconf.errors import InterpolationToMissingValueError

from grace_lightning.config import validate
from grace_lightning.train import train

from .test_train import TINY, make_cfg


def test_sup_grace_starts_from_an_infonce_export_and_trains(tmp_path):
    # stage 1: one InfoNCE step on the tiny model, exported
    cl_cfg = make_cfg([*TINY, "method=infonce", "trainer.max_steps=1"], tmp_path / "cl")
    _, cl = train(cl_cfg)
    export = tmp_path / "cl" / "export"

    # stage 2: the experiment, one override
    cfg = make_cfg([*TINY, "experiment=two_stage_sup", f"init_from={export}"], tmp_path / "grace")
    validate(cfg)
    assert cfg.backbone.source == "hub" and cfg.backbone.pretrained == str(export)
    assert cfg.reward.mode == "sup" and cfg.model._target_.endswith("GraceModule")
    module = hydra.utils.instantiate(cfg.model, _convert_="all")
    start = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    for name, p in cl["model"].policy.named_parameters():  # starts at stage 1's weights
        assert torch.equal(start[name], p.detach().cpu()), name

    _, objects = train(cfg)
    moved = [
        n for n, p in objects["model"].policy.named_parameters() if not torch.equal(p, start[n])
    ]
    assert moved and (tmp_path / "grace" / "export" / "config.json").exists()


def test_unsup_experiment_loads_a_local_export_dir(tiny_backbone, tmp_path):
    model, tok = tiny_backbone  # any save_pretrained dir stands in for a SimCSE export
    model.save_pretrained(tmp_path / "export")
    tok.save_pretrained(tmp_path / "export")
    cfg = make_cfg([*TINY, "experiment=two_stage_unsup", f"init_from={tmp_path}/export"])
    validate(cfg)
    assert cfg.reward.mode == "unsup" and cfg.backbone.name == "two_stage_unsup"
    module = hydra.utils.instantiate(cfg.model, _convert_="all")
    for (n, p), (_, q) in zip(module.policy.named_parameters(), model.named_parameters()):
        assert torch.equal(p.detach(), q.detach()), n


def test_missing_init_from_names_the_key(tmp_path):
    cfg = make_cfg([*TINY, "experiment=two_stage_sup"], tmp_path)
    with pytest.raises(InterpolationToMissingValueError, match="init_from"):
        _ = cfg.backbone.pretrained
