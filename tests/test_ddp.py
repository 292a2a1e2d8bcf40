"""Two-process CPU DDP (gloo) equals one process on the same global batch.

DDP: ``trainer=ddp_cpu`` with the same GLOBAL batch sizes as one process (4 prompts per rollout
batch, 2 groups per optimiser step: 2 prompts and 1 group on each of the 2 ranks). Both see the
same global batches (the sampler shards whole examples by rank), and since rollouts are seeded by
(seed, step, role, text) rather than by rank, the same rationales. The hard (cross-group) term
and ``algo.scale_rewards=batch`` only agree if they use the gathered global batch, and the
second rollout batch only agrees if the first update (DDP-averaged gradients, DAPO token
normaliser over ranks) did too.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import DATA_ROOT, ROOT

COMMON = [
    "experiment=none",  # the group defaults, not the quickstart job
    "backbone=tiny",
    "reward=sup",
    "data=shared",
    f"data.root={DATA_ROOT}",
    "data.max_examples=64",
    "rollout.num_generations=3",
    "rollout.max_new_tokens=6",
    "prompt.max_prompt_tokens=96",
    "optim.lr=1e-3",
    "optim.weight_decay=0",
    "reward.truncation=off",
    "algo.scale_rewards=batch",  # batch-normalised advantages: needs the global batch too
    "trainer.max_steps=4",  # 2 rollout batches x 2 optimiser steps
    "trainer.enable_progress_bar=false",
    "logger=none",
    "callbacks=none",
    "model._target_=tests.probes.RecordingGraceModule",
    # a reward term of the user's own that reads text: texts and rationales gathered over ranks
    "+reward.terms.echo={_target_:my_ext.echo_penalty,weight:0.01}",
]


def run_train(overrides: list[str], probe_dir, run_dir, timeout=240) -> None:
    env = dict(os.environ, GRACE_PROBE_DIR=str(probe_dir), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(  # tests/user_ext: my_ext.echo_penalty (COMMON)
        p for p in (str(ROOT / "tests" / "user_ext"), env.get("PYTHONPATH")) if p
    )
    keys = {o.split("=")[0] for o in overrides}
    common = [c for c in COMMON if c.split("=")[0] not in keys]  # an override replaces COMMON's
    cmd = [sys.executable, "train.py", *common, *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def by_text(records: list[dict], k: int) -> dict[str, dict]:
    """text -> its group's rationales, reward terms and advantages (from any rank)."""
    out = {}
    for rec in records:
        for i, text in enumerate(rec["texts"]):
            out[text] = {
                "rationales": rec["rationales"][i * k : (i + 1) * k],
                "advantages": rec["advantages"][i * k : (i + 1) * k],
                **{name: t[i] for name, t in rec["terms"].items()},
            }
    return out


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_two_process_ddp_equals_one_process_on_the_same_global_batch(tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    run_train(
        ["trainer=ddp_cpu", "data.prompts_per_step=4", "algo.prompts_per_minibatch=2"]
        + ["logger=csv"],
        ddp / "probe",
        ddp / "run",
    )
    run_train(
        ["trainer=cpu", "data.prompts_per_step=4", "algo.prompts_per_minibatch=2"] + ["logger=csv"],
        single / "probe",
        single / "run",
    )
    k = 3
    for step in (0, 2):
        ranks = [torch.load(ddp / "probe" / f"rank{r}_step{step:04d}.pt") for r in (0, 1)]
        one = torch.load(single / "probe" / f"rank0_step{step:04d}.pt")
        # sharded by rank: disjoint whole groups whose union is the single process's batch
        assert len(ranks[0]["texts"]) == len(ranks[1]["texts"]) == 2
        assert not set(ranks[0]["texts"]) & set(ranks[1]["texts"])
        assert set(ranks[0]["texts"]) | set(ranks[1]["texts"]) == set(one["texts"])
        for rec in ranks:  # a group's K rollouts all live on its rank
            assert len(rec["rationales"]) == len(rec["advantages"]) == 2 * k
        got, want = by_text(ranks, k), by_text([one], k)
        for text, w in want.items():
            g = got[text]
            assert g["rationales"] == w["rationales"], (step, text)
            for name in one["terms"]:
                torch.testing.assert_close(g[name], w[name], atol=1e-5, rtol=1e-5, msg=name)
            # batch-scaled advantages divide by the batch std (~0.03 at step 2): looser
            torch.testing.assert_close(g["advantages"], w["advantages"], atol=1e-3, rtol=1e-3)

        # the test can tell: rank 0's hard term from its own 2 groups alone differs
        from grace_lightning.rl.rewards import supervised_rewards

        r0 = ranks[0]
        local = supervised_rewards(
            r0["anchors"]["query"], r0["policy_emb"], r0["anchors"]["negatives"], tau=0.1
        )
        assert not torch.allclose(local["hard"], r0["terms"]["hard"], atol=1e-3)

    # after 4 optimiser steps: DDP ranks hold identical weights, equal to the single run's up
    # to float summation order (far below the size of the updates themselves)
    from grace_lightning.models.backbone import BackboneConfig, load_backbone

    init = dict(load_backbone(BackboneConfig(name="tiny", source="tiny"))[0].named_parameters())
    w0, w1, ws = (
        torch.load(path / "probe" / f"rank{r}_final.pt")
        for path, r in [(ddp, 0), (ddp, 1), (single, 0)]
    )
    diff = moved = 0.0
    for name, p in w0.items():
        assert torch.equal(p, w1[name]), f"DDP ranks diverged at {name}"
        diff += float((p - ws[name]).pow(2).sum())
        moved += float((ws[name] - init[name].detach()).pow(2).sum())
    assert moved > 0 and diff < 1e-6 * moved, (diff, moved)

    # logged rollout metrics are over the gathered batch (TRL), not rank 0's groups: the DDP run
    # logs what the single process logs
    ddp_rows, single_rows = logged_rows(ddp / "run"), logged_rows(single / "run")
    assert set(ddp_rows) == set(single_rows) and len(single_rows) == 2  # 2 rollout batches
    for step, want in single_rows.items():
        got = ddp_rows[step]
        for name in GATHERED_METRICS:
            assert abs(float(got[name]) - float(want[name])) < 1e-4, (
                step,
                name,
                got[name],
                want[name],
            )


GATHERED_METRICS = [
    "reward",
    "reward_std",
    "frac_reward_zero_std",
    "rewards/pos/mean",
    "rewards/pos/std",
    "rewards/hard/mean",
    "rewards/consistency/group_std",
    "completions/mean_length",
    "completions/max_length",
    "completions/clipped_ratio",
    "num_tokens",
]


def logged_rows(run_dir) -> dict[int, dict[str, str]]:
    """step -> the metrics.csv row that carries the rollout metrics (``reward`` logged)."""
    path = next(Path(run_dir).rglob("metrics.csv"))
    rows = list(csv.DictReader(path.read_text().splitlines()))
    return {int(r["step"]): r for r in rows if r.get("reward")}


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_zero_token_dapo_minibatch_under_ddp_leaves_weights_finite(tmp_path):
    """Issue 10: every rollout truncated + truncation=mask = no active token on any rank. DAPO's
    global token normaliser was 0: NaN loss, NaN gradients, NaN weights after AdamW."""
    run_train(
        [
            "trainer=ddp_cpu",
            "trainer.max_steps=2",
            "reward.truncation=mask",
            "rollout.max_new_tokens=4",  # the tiny random model never stops: all truncated
            "data.prompts_per_step=4",  # global: 2 a rank
            "algo.prompts_per_minibatch=4",  # global: one optimiser step a rollout batch
            "algo.loss_type=dapo",
            "algo.scale_rewards=none",
            "logger=csv",
        ],
        tmp_path / "probe",
        tmp_path / "run",
    )
    for rank in (0, 1):
        weights = torch.load(tmp_path / "probe" / f"rank{rank}_final.pt")
        bad = [n for n, w in weights.items() if not torch.isfinite(w).all()]
        assert not bad, f"rank {rank}: non-finite weights {bad}"
    rows = logged_rows(tmp_path / "run")
    assert rows, "no metrics logged"
    for row in rows.values():  # the case really happened: nothing entered the loss
        assert float(row["completions/clipped_ratio"]) == 1.0
        assert float(row["grad_norm"]) == 0.0 and float(row["loss"]) == 0.0
