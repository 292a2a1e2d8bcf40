"""Cluster and GPU-only configurations compose here, on a CPU-only box with no SLURM.

Nothing is submitted and no GPU is needed: the SLURM test runs the real ``train.py -m`` through
hydra-submitit-launcher up to ``sbatch``, which is a stand-in that keeps the batch script and
refuses the job.
"""

from __future__ import annotations

import os
import subprocess
import sys

import hydra
import pytest

from grace_lightning.config import validate
from grace_lightning.utils.checkpoint_io import AtomicCheckpointIO

from .conftest import ROOT
from .test_train import make_cfg

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e .[sweeps]")

FAKE_SLURM = """#!/bin/sh
cp "$1" "$FAKE_SBATCH_SCRIPT"
echo "fake $(basename "$0"): nothing submitted" >&2
exit 1
"""


def test_slurm_multirun_writes_the_batch_script_and_submits_nothing(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sbatch", "srun"):  # submitit looks for srun before it calls sbatch
        (bin_dir / tool).write_text(FAKE_SLURM)
        (bin_dir / tool).chmod(0o755)
    script = tmp_path / "job.sbatch"
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        FAKE_SBATCH_SCRIPT=str(script),
    )
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0 and "fake sbatch: nothing submitted" in proc.stderr, proc.stderr
    sbatch = script.read_text()
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",  # one task per GPU = trainer.devices
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=256GB",
        "#SBATCH --time=1440",
    ]:
        assert line in sbatch, sbatch
    assert "srun" in sbatch and "submitit.core._submit" in sbatch


@pytest.mark.parametrize("trainer, devices", [("ddp", 4), ("fsdp", 4), ("fsdp_offload", 4)])
def test_slurm_launcher_follows_the_trainer(trainer, devices, tmp_path):
    cfg = make_cfg(["hydra/launcher=slurm", f"trainer={trainer}", "trainer.num_nodes=3"], tmp_path)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.nodes == cfg.trainer.num_nodes == 3
    assert launcher.tasks_per_node == launcher.gpus_per_node == cfg.trainer.devices == devices
    assert launcher.timeout_min > 0 and launcher.mem_gb > 0 and launcher.cpus_per_task > 0
    hydra.utils.instantiate(launcher)  # builds the launcher object; submits nothing


# GPU-only settings (bf16 autocast, NCCL DDP, FSDP, FSDP CPU offload) cannot RUN on the CPU CI:
# their configs must at least compose, validate and build their strategy objects.
@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer=gpu"],
        ["trainer=ddp", "trainer.num_nodes=2"],
        ["trainer=fsdp"],
        ["trainer=fsdp_offload"],
        ["trainer=fsdp_offload", "peft=lora", "model.gradient_checkpointing=true"],
        ["trainer=ddp", "peft=lora", "experiment=paper_sup", "backbone=qwen"],
        ["trainer=fsdp", "experiment=paper_unsup", "backbone=qwen"],
    ],
    ids=lambda o: " ".join(o),
)
def test_gpu_only_configs_compose(overrides, tmp_path):
    cfg = make_cfg(overrides, tmp_path)
    validate(cfg)
    t = cfg.trainer
    assert t.accelerator == "gpu" and t.precision == "bf16-mixed"
    assert t.plugins[0]._target_.endswith("AtomicCheckpointIO")
    if "fsdp" in overrides[0]:
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = hydra.utils.instantiate(t.strategy)
        assert isinstance(strategy, FSDPStrategy)
        assert strategy.cpu_offload.offload_params == (overrides[0] == "trainer=fsdp_offload")
    else:
        assert t.get("strategy", "auto") in ("auto", "ddp")


@pytest.mark.parametrize("trainer", ["cpu", "ddp_cpu"])
def test_cpu_trainers_build_with_atomic_checkpoints(trainer, tmp_path):
    cfg = make_cfg([f"trainer={trainer}"], tmp_path)
    built = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert isinstance(built.strategy.checkpoint_io, AtomicCheckpointIO)
    assert built.world_size == (2 if trainer == "ddp_cpu" else 1)
