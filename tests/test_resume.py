"""Resume after ``kill -9``: crash-safe writes, and a real training run killed mid-step.

The end-to-end test runs ``train.py`` three times on the tiny model, checkpointing every rollout
batch (2 optimiser steps each, 3 batches): an uninterrupted reference, a run that is SIGKILLed
in the middle of its second batch (its rationale rows for step 4 written, the step-4 checkpoint
not: see ``tests/probes.py::StallAt``), and the same command again with ``ckpt_path=last``.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from grace_lightning.utils.atomic import stale_temps, temp_name
from grace_lightning.utils.checkpoint_io import AtomicCheckpointIO
from grace_lightning.utils.csv_logger import SafeCSVLogger
from grace_lightning.utils.resume import (
    orphans_path,
    persist_wandb_id,
    resolve_ckpt_path,
    trim_table,
)

from .conftest import DATA_ROOT, ROOT

# ----------------------------------------------------------------------------- crash-safe writes


def test_checkpoint_save_interrupted_midway_keeps_the_previous_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 2, "w": torch.ones(10)}, path)

    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 4, "w": torch.zeros(10)}, path)
    monkeypatch.setattr(torch, "save", real_save)

    assert io.load_checkpoint(path)["global_step"] == 2
    assert not stale_temps(path)


def test_stale_temp_of_a_killed_writer_is_removed_on_the_next_save(tmp_path):
    path = tmp_path / "last.ckpt"
    leftover = temp_name(path).with_name(f".last.ckpt.tmp-{os.getpid() + 1}")
    leftover.write_bytes(b"x" * 100)  # what a SIGKILL during a save leaves
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, path)
    assert not leftover.exists() and torch.load(path)["global_step"] == 1


SAVE_LOOP = """
import sys, torch
from grace_lightning.utils.checkpoint_io import AtomicCheckpointIO
io, big = AtomicCheckpointIO(), torch.randn(4_000_000)  # 16 MB a save
for step in range(10**6):
    io.save_checkpoint({"global_step": step, "w": big}, sys.argv[1])
    print(step, flush=True)
"""


def test_sigkill_during_checkpoint_writes_never_leaves_a_corrupt_file(tmp_path):
    path = tmp_path / "last.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-c", SAVE_LOOP, str(path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    for _ in range(3):  # let a few saves complete, then kill at an arbitrary point of the next
        assert proc.stdout.readline(), "the save loop died"
    time.sleep(0.05)
    proc.kill()
    proc.wait()
    ckpt = torch.load(path)
    assert ckpt["global_step"] >= 2 and ckpt["w"].numel() == 4_000_000


def test_csv_header_rewrite_interrupted_keeps_earlier_rows(tmp_path, monkeypatch):
    logger = SafeCSVLogger(tmp_path, name="csv", flush_logs_every_n_steps=1)
    logger.log_metrics({"reward": 0.5}, step=0)
    metrics = Path(logger.experiment.metrics_file_path)
    before = metrics.read_text()

    def crash(self, rows):
        raise KeyboardInterrupt

    monkeypatch.setattr(csv.DictWriter, "writerows", crash)
    with pytest.raises(KeyboardInterrupt):
        logger.log_metrics({"reward": 0.6, "val/reward": 0.1}, step=1)  # a new key: rewrite
    assert metrics.read_text() == before


def test_trim_table_moves_rows_after_the_checkpoint_and_a_torn_line(tmp_path):
    table = tmp_path / "rationales.jsonl"
    rows = [{"step": s, "text": f"t{s}{i}"} for s in (2, 4) for i in range(2)]
    kept = "".join(json.dumps(r) + "\n" for r in rows[:2])
    table.write_text(kept + "".join(json.dumps(r) + "\n" for r in rows[2:]) + '{"step": 6, "te')
    assert trim_table(table, last_step=2) == 3
    assert table.read_text() == kept
    orphans = orphans_path(table).read_text().splitlines()
    assert [json.loads(x)["step"] for x in orphans[:2]] == [4, 4] and orphans[2].startswith('{"')
    assert trim_table(table, last_step=2) == 0  # idempotent


def test_wandb_id_is_kept_in_the_run_dir_and_reused_on_resume(tmp_path):
    def cfg(ckpt_path=None, run_id=None):
        return OmegaConf.create(
            {
                "ckpt_path": ckpt_path,
                "paths": {"output_dir": str(tmp_path)},
                "logger": {"wandb": {"id": run_id}},
            }
        )

    first = persist_wandb_id(cfg())
    assert first and (tmp_path / "wandb_id.txt").read_text().strip() == first
    c = cfg(ckpt_path="last")
    assert persist_wandb_id(c) == first and c.logger.wandb.id == first
    assert persist_wandb_id(cfg()) != first  # a fresh start in the same dir is a new run
    assert persist_wandb_id(cfg(ckpt_path="last", run_id="given1")) == "given1"
    assert (tmp_path / "wandb_id.txt").read_text().strip() == "given1"
    assert persist_wandb_id(OmegaConf.create({"logger": {"csv": {}}})) is None


# ----------------------------------------------------------------------------- kill -9, resume

CLI = [
    "experiment=none",  # the group defaults, not the quickstart job
    "backbone=tiny",
    "reward=sup",
    "data=shared",
    f"data.root={DATA_ROOT}",
    "data.max_examples=64",
    "data.prompts_per_step=2",
    "algo.prompts_per_minibatch=1",  # 2 optimiser steps per rollout batch
    "rollout.num_generations=3",
    "rollout.max_new_tokens=6",
    "prompt.max_prompt_tokens=96",
    "optim.lr=1e-3",
    "reward.truncation=off",
    "trainer.max_steps=6",  # 3 rollout batches: table steps 2, 4, 6
    "trainer.enable_progress_bar=false",
    "callbacks.model_checkpoint.every_n_rollout_batches=1",
]


def start(run_dir: Path, extra: list[str], cli: list[str] = CLI) -> subprocess.Popen:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    log = open(run_dir.parent / f"{run_dir.name}.log", "a")  # noqa: SIM115 (closed by the OS)
    return subprocess.Popen(
        [sys.executable, "train.py", *cli, *extra, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the kill takes its helpers too
    )


def finish(proc: subprocess.Popen, run_dir: Path, timeout: float = 300) -> None:
    rc = proc.wait(timeout=timeout)
    log = (run_dir.parent / f"{run_dir.name}.log").read_text()
    assert rc == 0, log[-6000:]


def table(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "rationales.jsonl").read_text().splitlines()]


def test_kill_9_mid_step_then_ckpt_path_last_continues_as_if_never_killed(tmp_path):
    ref_dir, run_dir, marker = tmp_path / "ref", tmp_path / "run", tmp_path / "stalled"
    ref = start(ref_dir, ["logger=csv"])
    command = [
        "logger=many",  # csv + wandb (offline)
        "+callbacks.stall._target_=tests.probes.StallAt",
        "+callbacks.stall.step=4",
        f"+callbacks.stall.marker={marker}",
    ]
    run = start(run_dir, command)
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert run.poll() is None, (run_dir.parent / "run.log").read_text()[-6000:]
        assert time.monotonic() < deadline, "the run never reached step 4"
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGKILL)  # mid-step: step-4 rows written, step-4 checkpoint not
    run.wait()

    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["last.ckpt", "step_000002.ckpt"]
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 2
    assert {r["step"] for r in table(run_dir)} == {2, 4}
    metrics_v0 = run_dir / "csv" / "version_0" / "metrics.csv"
    before = {
        "metrics": metrics_v0.read_bytes(),
        "table": (run_dir / "rationales.jsonl").read_bytes(),
        "wandb_id": (run_dir / "wandb_id.txt").read_text(),
    }
    assert b"reward" in before["metrics"]  # the first batch's row reached disk before the kill

    finish(start(run_dir, [*command, "ckpt_path=last"]), run_dir)  # the same command, resumed
    finish(ref, ref_dir)

    # the step count continued from the checkpoint and training ended where the reference did
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 6
    names = sorted(p.name for p in ckpts.iterdir())  # no last-v1.ckpt, no temp files
    assert names == ["last.ckpt", "step_000002.ckpt", "step_000004.ckpt", "step_000006.ckpt"]
    export = json.loads((run_dir / "export" / "grace_config.json").read_text())
    assert export["global_step"] == 6 and (run_dir / "export" / "model.safetensors").exists()

    # data order and sampling continued: the same texts and rationales as the uninterrupted run,
    # each step once; the killed run's step-4 rows were set aside, and equal the redone ones
    got, want = table(run_dir), table(ref_dir)
    assert [r["step"] for r in got] == [2] * 6 + [4] * 6 + [6] * 6
    trace = [(r["step"], r["text"], r["rationale"]) for r in got]
    assert trace == [(r["step"], r["text"], r["rationale"]) for r in want]
    for g, w in zip(got, want):
        assert g["reward"] == pytest.approx(w["reward"], abs=1e-5)
    orphaned = orphans_path(run_dir / "rationales.jsonl").read_text().splitlines()
    orphans = [json.loads(x) for x in orphaned]
    assert [(r["text"], r["rationale"]) for r in orphans] == [
        (r["text"], r["rationale"]) for r in got if r["step"] == 4
    ]

    # nothing written before the kill was lost or corrupted
    lines = before["table"].splitlines(keepends=True)
    checkpointed = b"".join(x for x in lines if json.loads(x)["step"] <= 2)
    assert (run_dir / "rationales.jsonl").read_bytes().startswith(checkpointed)
    assert metrics_v0.read_bytes() == before["metrics"]
    rows_v0 = list(csv.DictReader(metrics_v0.open()))
    rows_v1 = list(csv.DictReader((run_dir / "csv" / "version_1" / "metrics.csv").open()))
    assert rows_v0 and rows_v1 and all(None not in r for r in rows_v0 + rows_v1)  # no torn rows
    assert min(int(r["step"]) for r in rows_v1) > min(int(r["step"]) for r in rows_v0)

    # W&B: the resumed run logged under the id the first start saved
    run_id = before["wandb_id"].strip()
    assert (run_dir / "wandb_id.txt").read_text() == before["wandb_id"]
    offline_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(p.name.endswith(f"-{run_id}") for p in offline_runs)


# ----------------------------------------------------------------------------- a torn last.ckpt


def _ckpt(path: Path, step: int, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "w": torch.randn(5000)}, path)
    os.utime(path, (mtime, mtime))
    return path


def _cut_in_half(path: Path) -> None:
    stat = path.stat()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    os.utime(path, (stat.st_atime, stat.st_mtime))


def test_ckpt_path_last_takes_the_newest_checkpoint_that_loads(tmp_path, caplog):
    ckpts = tmp_path / "checkpoints"
    assert resolve_ckpt_path("last", tmp_path) is None  # nothing saved yet: a fresh start
    assert resolve_ckpt_path(None, tmp_path) is None
    step2 = _ckpt(ckpts / "step_000002.ckpt", 2, 1000)
    step4 = _ckpt(ckpts / "step_000004.ckpt", 4, 2000)
    last = _ckpt(ckpts / "last.ckpt", 4, 2000)  # written with step 4: the same time
    hpc = _ckpt(tmp_path / "hpc_ckpt_1.ckpt", 3, 1500)
    assert resolve_ckpt_path("last", tmp_path) == str(last)  # first among equals
    _cut_in_half(last)
    with caplog.at_level("WARNING"):
        assert resolve_ckpt_path("last", tmp_path) == str(step4)
    assert f"skipped {last}, it does not load (not a whole zip archive" in caplog.text
    # kept for inspection, out of the way of the resumed run's next last.ckpt
    assert not last.exists() and (ckpts / "last.ckpt.unreadable").is_file()
    _cut_in_half(step4)
    assert resolve_ckpt_path("last", tmp_path) == str(hpc)  # the SLURM requeue save
    hpc.write_bytes(b"")
    assert resolve_ckpt_path("last", tmp_path) == str(step2)
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "last.ckpt.unreadable",
        "step_000002.ckpt",
        "step_000004.ckpt.unreadable",
    ]
    _cut_in_half(step2)
    with pytest.raises(RuntimeError, match="no checkpoint in .* loads: .*step_000002.ckpt"):
        resolve_ckpt_path("last", tmp_path)  # not silently a fresh start over it
    assert step2.exists()  # nothing moved when nothing loads
    assert resolve_ckpt_path(str(step2), tmp_path) == str(step2)  # a named file is kept
    sharded = ckpts / "last.ckpt"  # FSDP state_dict_type=sharded: a directory
    sharded.mkdir()
    (sharded / ".metadata").write_bytes(b"x")
    assert resolve_ckpt_path("last", tmp_path) == str(sharded)


def test_ckpt_path_last_resumes_from_the_step_checkpoint_when_last_ckpt_is_cut_in_half(tmp_path):
    """A full disk or a bad copy: ``last.ckpt`` cut in half, ``step_000002.ckpt`` intact beside it.
    Before: ``ckpt_path=last`` stopped with torch's "PytorchStreamReader failed reading zip
    archive"."""
    run_dir = tmp_path / "run"
    cli = [c for c in CLI if not c.startswith("trainer.max_steps=")]
    # 1 rollout batch: step_000002.ckpt + last.ckpt
    finish(start(run_dir, ["logger=csv", "trainer.max_steps=2"], cli), run_dir)
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["last.ckpt", "step_000002.ckpt"]
    _cut_in_half(ckpts / "last.ckpt")
    with pytest.raises(RuntimeError, match="PytorchStreamReader failed reading zip archive"):
        torch.load(ckpts / "last.ckpt", weights_only=False)

    finish(start(run_dir, ["logger=csv", "trainer.max_steps=4", "ckpt_path=last"], cli), run_dir)
    log = (run_dir.parent / "run.log").read_text()
    assert f"skipped {ckpts / 'last.ckpt'}, it does not load" in log
    assert f"resuming from {ckpts / 'step_000002.ckpt'}" in log
    last = torch.load(ckpts / "last.ckpt", weights_only=False)
    assert last["global_step"] == 4  # went on from step 2, and last.ckpt is whole again
    names = sorted(p.name for p in ckpts.iterdir())  # no last-v1.ckpt beside a torn last.ckpt
    assert names == ["last.ckpt", "last.ckpt.unreadable", "step_000002.ckpt", "step_000004.ckpt"]
    assert [r["step"] for r in table(run_dir)] == [2] * 6 + [4] * 6  # each step once


# ----------------------------------------------------------------------------- cadence


def test_checkpoints_every_n_rollout_batches_and_at_the_end(tmp_path):
    """2 optimiser steps per rollout batch, 3 batches: every 2nd rollout batch = step 4 (not
    Lightning's step count), and the end of training = step 6."""
    run_dir = tmp_path / "run"
    cli = [c for c in CLI if "model_checkpoint" not in c]
    proc = subprocess.Popen(
        [
            sys.executable,
            "train.py",
            *cli,
            "logger=none",
            "callbacks.model_checkpoint.every_n_rollout_batches=2",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "last.ckpt",
        "step_000004.ckpt",
        "step_000006.ckpt",
    ]
    last = torch.load(ckpts / "last.ckpt", weights_only=False)
    assert last["global_step"] == 6
    (state,) = [v for k, v in last["callbacks"].items() if k.startswith("RolloutCheckpoint")]
    assert state["rollout_batches"] == 3  # a resumed run goes on counting from here
