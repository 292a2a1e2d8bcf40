"""Batch sizes are GLOBAL (verl's train_batch_size / ppo_mini_batch_size): ``data.prompts_per_step``
policy prompts a rollout batch and ``algo.prompts_per_minibatch`` groups an optimiser step over all
ranks, each rank taking 1/world of both, so the paper recipe is the same on 1, 2 or 4 GPUs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from grace_lightning.config import ConfigError, validate

from .conftest import DATA_ROOT, ROOT
from .test_train import make_cfg


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["data.prompts_per_step=6", "algo.prompts_per_minibatch=2"], "data.prompts_per_step=6"),
        (
            ["data.prompts_per_step=4", "algo.prompts_per_minibatch=1"],
            "algo.prompts_per_minibatch=1",
        ),
    ],
)
def test_batch_sizes_must_split_over_the_ranks(overrides, key, tmp_path):
    cfg = make_cfg(["trainer=ddp", "trainer.devices=4", *overrides], tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    msg = str(err.value)
    assert key in msg and "trainer.devices=4 x trainer.num_nodes=1 = 4" in msg


def test_world_size_counts_nodes_and_the_paper_recipe_splits(tmp_path):
    with pytest.raises(ConfigError, match="= 8"):  # 16 / 8 fine, 16 / 8 per step fine; 12 not
        validate(
            make_cfg(
                [
                    "trainer=ddp",
                    "trainer.num_nodes=2",
                    "data.prompts_per_step=12",
                    "algo.prompts_per_minibatch=4",
                ],
                tmp_path,
            )
        )
    for devices in (1, 2, 4):  # upstream: 64 prompts, 16 a mini-batch, on 1, 2 or 4 GPUs
        validate(
            make_cfg(
                [
                    "experiment=paper_sup",
                    "backbone=qwen",
                    "trainer=ddp",
                    f"trainer.devices={devices}",
                ],
                tmp_path,
            )
        )


def test_the_datamodule_gives_each_rank_its_share(tmp_path):
    from grace_lightning.data.datamodule import GraceDataModule
    from grace_lightning.data.readers import DataError

    sup = {"kind": "jsonl", "path": "snli_triplets/triplets_dev.jsonl"}
    sup |= {"query_field": "anchor", "negative_field": "hard_negative"}
    dm = GraceDataModule(mode="sup", sup=sup, root=DATA_ROOT, max_examples=64, prompts_per_step=8)
    dm.load()
    for world, per in [(1, 8), (2, 4), (4, 2)]:
        dm.rank, dm.world_size = 0, world
        assert dm.per_rank_batch() == per
        assert len(next(iter(dm.train_dataloader()))["query"]) == per
    dm.world_size = 3
    with pytest.raises(DataError, match="prompts_per_step=8"):
        dm.train_dataloader()


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_two_ranks_consume_the_global_batch(tmp_path):
    """trainer=ddp_cpu, prompts_per_step=4, prompts_per_minibatch=2: each rank rolls out 2
    prompts a rollout batch, 4 distinct examples over both ranks; 2 optimiser steps a rollout
    batch, each on 1 group a rank = 2 groups over the ranks (per-device sizes gave each rank 4
    prompts, 8 a rollout batch, and 2 groups a rank an optimiser step)."""
    probe, run = tmp_path / "probe", tmp_path / "run"
    cmd = [
        sys.executable,
        "train.py",
        "experiment=none",
        "backbone=tiny",
        "reward=sup",
        "data=shared",
        f"data.root={DATA_ROOT}",
        "data.max_examples=64",
        "data.prompts_per_step=4",
        "algo.prompts_per_minibatch=2",
        "rollout.num_generations=2",
        "rollout.max_new_tokens=4",
        "prompt.max_prompt_tokens=96",
        "reward.truncation=off",
        "trainer=ddp_cpu",
        "trainer.max_steps=4",  # 2 rollout batches
        "trainer.enable_progress_bar=false",
        "logger=none",
        "callbacks=none",
        "model._target_=tests.probes.MiniBatchRecordingModule",
        f"hydra.run.dir={run}",
    ]
    env = dict(os.environ, GRACE_PROBE_DIR=str(probe), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    steps = sorted({p.stem.split("_step")[1] for p in probe.glob("rank*_step*.pt")})
    assert steps == ["0000", "0002"]  # rollout batches start at optimiser steps 0 and 2
    seen = set()
    for step in steps:
        recs = [torch.load(probe / f"rank{r}_step{step}.pt") for r in (0, 1)]
        for rec in recs:
            assert len(rec["texts"]) == 2  # 4 prompts / 2 ranks
            # this rank's mini-batches: 1 group each (2 / 2 ranks), 2 optimiser steps
            assert rec["minibatch_groups"] == [1, 1]
        texts = recs[0]["texts"] + recs[1]["texts"]
        assert len(set(texts)) == 4  # distinct examples over the ranks
        seen |= set(texts)
    assert len(seen) == 8  # and the second rollout batch takes 4 new ones
