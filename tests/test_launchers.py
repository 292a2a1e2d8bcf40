"""Cluster and GPU-only configurations compose here, on a CPU-only box with no SLURM.

Nothing is submitted and no GPU is needed: the SLURM test runs the real ``train.py -m`` through
hydra-submitit-launcher up to ``sbatch``, which is a stand-in that keeps the batch script and
refuses the job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import hydra
import pytest
import torch

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
    if not any(o.startswith("experiment=") for o in overrides):
        # batch sizes are global: the CPU defaults (4 prompts, 2 a mini-batch) cannot split over
        # 4 or 8 GPUs; the paper presets' 64 and 16 can
        overrides = [*overrides, "data.prompts_per_step=16", "algo.prompts_per_minibatch=8"]
    cfg = make_cfg(overrides, tmp_path)
    validate(cfg)
    t = cfg.trainer
    assert t.accelerator == "gpu" and t.precision == "bf16-mixed"
    assert t.plugins[0]._target_.endswith("AtomicCheckpointIO")
    if "fsdp" in overrides[0]:
        from grace_lightning.utils.fsdp import GraceFSDPStrategy

        strategy = hydra.utils.instantiate(t.strategy)
        assert isinstance(strategy, GraceFSDPStrategy) and strategy.auto_wrap == "decoder_layer"
        assert strategy.cpu_offload.offload_params == (overrides[0] == "trainer=fsdp_offload")
    else:
        assert t.get("strategy", "auto") in ("auto", "ddp")


@pytest.mark.parametrize("trainer", ["cpu", "ddp_cpu"])
def test_cpu_trainers_build_with_atomic_checkpoints(trainer, tmp_path):
    from grace_lightning.train import build_trainer

    cfg = make_cfg([f"trainer={trainer}"], tmp_path)
    built = build_trainer(cfg, [], [])
    assert isinstance(built.strategy.checkpoint_io, AtomicCheckpointIO)
    assert built.world_size == (2 if trainer == "ddp_cpu" else 1)


# ----------------------------------------------------------------------------- SLURM requeue

FAKE_SCONTROL = """#!/bin/sh
echo "$@" >> "$FAKE_SCONTROL_LOG"
exit 0
"""

# what submitit's job process does before it runs train.py: its own SIGUSR2 handler
# (requeue without a Lightning checkpoint), which Lightning would not replace by itself
AS_SUBMITIT = """
import runpy, signal, sys
marker = sys.argv.pop(1)
signal.signal(signal.SIGUSR2, lambda *a: open(marker, "w").write("submitit handler ran"))
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""

REQUEUE_CLI = [
    "experiment=none",  # the group defaults, not the quickstart job
    "backbone=tiny",
    "reward=sup",
    "data=shared",
    "data.max_examples=64",
    "data.prompts_per_step=2",
    "algo.prompts_per_minibatch=1",  # 2 optimiser steps per rollout batch
    "rollout.num_generations=2",
    "rollout.max_new_tokens=4",
    "prompt.max_prompt_tokens=96",
    "reward.truncation=off",
    "trainer.max_steps=4",
    "trainer.enable_progress_bar=false",
    "logger=csv",
    "callbacks.model_checkpoint.every_n_rollout_batches=0",  # only the signal and the end save
]


def test_usr2_under_slurm_saves_a_checkpoint_requeues_and_the_requeued_job_resumes(tmp_path):
    from .conftest import DATA_ROOT

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    run_dir, marker, foreign = tmp_path / "run", tmp_path / "stalled", tmp_path / "submitit"
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        FAKE_SCONTROL_LOG=str(tmp_path / "scontrol.log"),
        OMP_NUM_THREADS="1",
        SLURM_JOB_ID="4242",  # a one-task SLURM job step, as srun/submitit start it
        SLURM_JOB_NAME="grace",
        SLURM_NTASKS="1",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_NODELIST="localhost",
        SLURM_NODEID="0",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
    )
    cli = [*REQUEUE_CLI, f"data.root={DATA_ROOT}", f"hydra.run.dir={run_dir}"]
    stall = [
        "+callbacks.stall._target_=tests.probes.StallAt",
        "+callbacks.stall.step=2",  # after the first rollout batch
        f"+callbacks.stall.marker={marker}",
    ]
    log = open(tmp_path / "run.log", "w")  # noqa: SIM115 (closed by the OS)
    proc = subprocess.Popen(
        [sys.executable, "-c", AS_SUBMITIT, str(foreign), *cli, *stall],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the run never reached step 2"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGUSR2)  # what SLURM sends signal_delay_s before the limit
        deadline = time.monotonic() + 120
        while not (tmp_path / "scontrol.log").exists():
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-4000:]
            assert time.monotonic() < deadline, (tmp_path / "run.log").read_text()[-4000:]
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # SLURM ends the job after `scontrol requeue`
        proc.wait()
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert not foreign.exists()  # Lightning's handler ran instead of submitit's
    hpc = sorted(run_dir.glob("hpc_ckpt_*.ckpt"))
    assert [p.name for p in hpc] == ["hpc_ckpt_1.ckpt"]
    assert torch.load(hpc[0], weights_only=False)["global_step"] == 2

    # the requeued job: same command (the marker exists, no stall) with ckpt_path=last
    resumed = subprocess.run(
        [sys.executable, "train.py", *cli, *stall, "ckpt_path=last"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-4000:]
    assert "hpc_ckpt_1.ckpt" in out  # Lightning: "Restoring states from the checkpoint path at"
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 4  # continued from step 2 to max_steps, saved at the end


def test_slurm_environment_plugin_only_under_slurm(monkeypatch, tmp_path):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from grace_lightning.train import build_trainer
    from grace_lightning.utils.slurm import cluster_environment, slurm_environment

    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    assert slurm_environment("USR2") is None
    cfg = make_cfg(["trainer=cpu"], tmp_path)
    assert not isinstance(cluster_environment(build_trainer(cfg, [], [])), SLURMEnvironment)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_JOB_NAME", "grace")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    env = cluster_environment(build_trainer(cfg, [], []))
    assert isinstance(env, SLURMEnvironment) and env.requeue_signal == signal.SIGUSR2
    assert env.auto_requeue
