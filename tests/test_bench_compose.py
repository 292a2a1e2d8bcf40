"""The bench scripts measure the group defaults, whatever ``experiment`` train.yaml picks.

``python train.py`` runs ``experiment=quickstart`` (joint loss, dev scoring, shared data, a time
budget). A bench that composes ``train`` without ``experiment=none`` silently measures that
preset instead, and ``bench/paper_scale.py --gpu`` then fails on the dev suite's data path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra.core.global_hydra import GlobalHydra

from bench import memory, paper_scale, train_step

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clear_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def _cfgs(tmp_path):
    args = SimpleNamespace(
        groups=2, k=2, new_tokens=8, prompt_tokens=64, repeats=1, precision="fp32",
        data=str(tmp_path / "triplets.jsonl"),
    )  # fmt: skip
    point = paper_scale.Point(tiny=True, groups=2, k=2, prompt_len=32, response_len=8)
    yield "memory", memory.compose(args, "full", str(tmp_path / "m"))
    yield "train_step", train_step.compose(args, str(tmp_path / "t"))
    yield "paper_scale", paper_scale.compose(point, args.data, str(tmp_path / "p"))[0]


def test_bench_configs_are_the_group_defaults(tmp_path):
    for name, cfg in _cfgs(tmp_path):
        assert "quickstart" not in cfg.tags, name
        assert "dev_eval" not in (cfg.callbacks or {}), name  # no dev suite (data, minutes)
        assert cfg.algo.contrastive_weight == 0, name  # the paper's loss, not the joint one
        assert cfg.trainer.get("max_time") is None, name  # steps, not a wall-time budget


def test_paper_scale_gpu_path_runs_on_cpu_and_leaves_no_temp_dir(tmp_path):
    """``--gpu --device cpu --tiny``: the GPU check's code path end to end (one rollout batch),
    and the point's run dir (GBs of checkpoints at paper shapes) is gone afterwards."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    cmd = [sys.executable, str(ROOT / "bench" / "paper_scale.py"), "--gpu", "--device", "cpu"]
    cmd += ["--tiny", "--prompts", "2", "--k", "2", "--response-len", "8"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    check = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith('{"gpu_check"')))
    assert check["gpu_check"]["wall_s"] > 0 and check["gpu_check"]["peaks"]["update"] > 0
    assert not list(tmp_path.glob("bench-paper-scale-*"))


def test_paper_scale_measure_runs_a_point_in_a_child_and_cleans_its_temp(tmp_path, monkeypatch):
    """measure(): one point in a subprocess, and nothing of it stays in the temp dir (the
    child's files go under a scratch dir the parent removes, even if the child is killed)."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    point = paper_scale.Point(tiny=True, groups=2, k=2, prompt_len=96, response_len=8)
    results = paper_scale.measure([point], None, log=lambda *a: None)
    assert len(results) == 1 and results[0]["peaks"]["update"] > 0
    assert not list(tmp_path.iterdir())
