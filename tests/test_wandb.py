"""W&B, offline (``WANDB_MODE=offline``, no server): one W&B run per training job, the whole
resolved config under ``cfg``, tags from the resolved config, and a run started the way
``wandb agent`` starts one.

The runs' records are read back from their offline ``run-<id>.wandb`` files
(``grace_lightning.utils.wandb.read_offline_run``), which is what ``wandb sync`` would upload.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from grace_lightning.sweeps import report
from grace_lightning.utils.resume import WANDB_ID_FILE, persist_wandb_id
from grace_lightning.utils.wandb import (
    GraceWandbLogger,
    finish_wandb_run,
    read_offline_run,
    run_tags,
    wandb_logger,
)

from .conftest import DATA_ROOT, ROOT

pytest.importorskip("wandb")

# the tiny model, one rollout batch (2 optimiser steps), no checkpoints: a few seconds a job
CLI = [
    "experiment=none",
    "backbone=tiny",
    "data=shared",
    f"data.root={DATA_ROOT}",
    "data.max_examples=32",
    "data.prompts_per_step=2",
    "algo.prompts_per_minibatch=1",
    "rollout.num_generations=2",
    "rollout.max_new_tokens=4",
    "prompt.max_prompt_tokens=96",
    "reward.truncation=off",
    "trainer.max_steps=2",
    "trainer.enable_progress_bar=false",
    "callbacks=none",
]


AGENT_ENV = ("WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH")


def run_train(args: list[str], env: dict[str, str] | None = None) -> str:
    """``python train.py <args>`` offline; only ``env`` sets the agent's variables."""
    base = {k: v for k, v in os.environ.items() if k not in AGENT_ENV}
    env = {
        **base,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_two_multirun_jobs_are_two_wandb_runs_each_with_its_config_and_history(tmp_path):
    """Before: Lightning's WandbLogger reused job 0's still-active run for job 1 ("There is a
    wandb run already in progress"): one offline run for two jobs, job 1 had none."""
    sweep_dir = tmp_path / "multirun"
    out = run_train(
        ["-m", *CLI, "reward=sup", "logger=wandb", "seed=1,2", f"hydra.sweep.dir={sweep_dir}"]
    )
    assert "already in progress" not in out
    runs = {}
    for job, seed in (("0", 1), ("1", 2)):
        (run_dir,) = offline_runs(sweep_dir / job)  # each job its own run, in its own run dir
        runs[job] = run = read_offline_run(run_dir)
        assert run_dir.name.endswith(run["id"])
        assert (sweep_dir / job / WANDB_ID_FILE).read_text().strip() == run["id"]
        cfg = run["config"]["cfg"]  # the full resolved config of THIS job
        assert cfg["seed"] == seed and cfg["backbone"]["name"] == "tiny"
        assert cfg["reward"]["mode"] == "sup" and cfg["paths"]["output_dir"].endswith(job)
        assert cfg["model"]["_target_"].endswith("GraceModule")  # + Lightning's model hparams
        assert cfg["model"]["seed"] == seed and cfg["model"]["rollout"]["num_generations"] == 2
        assert run["config"]["choices"]["backbone"] == "tiny"
        assert {"backbone", "reward", "algo"}.isdisjoint(run["config"])  # nothing at top level
        steps = [row for row in run["history"] if "reward" in row]
        assert steps, run["history"]  # its own training history
        assert run["exit_code"] == 0  # finished when the job ended
        assert set(run["tags"]) >= {"sup", "grace", "tiny", "dev"}
    assert runs["0"]["id"] != runs["1"]["id"]
    # the sweep report reads these configs as it reads a W&B API run's (report --wandb)
    config = report.wandb_run_config(runs["1"]["config"])
    row = report.describe(OmegaConf.create(config["cfg"]), config["choices"])
    assert (row["backbone"], row["method"], row["mode"], row["algo"]) == (
        "tiny",
        "grace",
        "sup",
        "grpo",
    )


def test_a_sweep_agent_run_keeps_the_sweep_parameters_and_logs_the_full_config(tmp_path):
    """The set-up ``wandb agent`` gives its child (wandb/wandb_agent.py ``_command_run``):
    ``WANDB_SWEEP_ID``, ``WANDB_RUN_ID`` and ``WANDB_SWEEP_PARAM_PATH`` (the run's parameters,
    which ``wandb.init`` sets on ``wandb.config`` locked), and the parameters on the command line
    as ``${args_no_hyphens}``. Before: the locked ``backbone``/``reward`` strings swallowed the
    logged config groups, the run got a ``wandb_id.txt`` id W&B ignores, and the experiment's
    ``sup`` tag stayed on an unsup run."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args
    from wandb.sdk.lib import config_util

    params = {"backbone": {"value": "tiny"}, "reward": {"value": "unsup"}}
    param_path = tmp_path / "wandb" / "sweep-sw1" / "config-agentrun1.yaml"
    param_path.parent.mkdir(parents=True)
    config_util.save_config_file_from_dict(str(param_path), params)  # as the agent writes it
    args = create_sweep_command_args({"args": params})["args_no_hyphens"]
    assert args == ["backbone=tiny", "reward=unsup"]
    run_dir = tmp_path / "run"
    cli = [c for c in CLI if not c.startswith("backbone=")]
    run_train(
        [*cli, "logger=wandb", "tags=[paper,sup]", f"hydra.run.dir={run_dir}", *args],
        env={
            "WANDB_SWEEP_ID": "sw1",
            "WANDB_RUN_ID": "agentrun1",
            "WANDB_SWEEP_PARAM_PATH": str(param_path),
        },
    )
    (offline,) = offline_runs(run_dir)
    run = read_offline_run(offline)
    assert run["id"] == "agentrun1" and run["sweep_id"] == "sw1"  # the agent's run
    assert not (run_dir / WANDB_ID_FILE).exists()
    config = run["config"]
    assert config["backbone"] == "tiny" and config["reward"] == "unsup"  # as the agent set them
    cfg = config["cfg"]  # and every resolved key, nested groups included
    assert cfg["backbone"]["name"] == "tiny" and cfg["backbone"]["source"]
    assert cfg["reward"]["mode"] == "unsup" and cfg["reward"]["tau"] > 0
    assert cfg["algo"]["prompts_per_minibatch"] == 1 and cfg["optim"]["lr"] > 0
    assert cfg["trainer"]["max_steps"] == 2 and cfg["tags"] == ["paper", "sup"]
    assert config["choices"]["reward"] == "unsup"
    assert "unsup" in run["tags"] and "sup" not in run["tags"]  # tags follow reward.mode
    assert {"paper", "grace", "tiny"} <= set(run["tags"])
    assert run["exit_code"] == 0 and any("reward" in row for row in run["history"])


# ----------------------------------------------------------------------------- units


def test_tags_follow_the_resolved_config():
    assert run_tags(["paper", "sup"], ["unsup", "grace", "qwen"]) == [
        "unsup",
        "grace",
        "qwen",
        "paper",
    ]
    assert run_tags(["paper", "infonce"], ["sup", "simcse", "llama"]) == [
        "sup",
        "simcse",
        "llama",
        "paper",
    ]
    assert run_tags(["dev", "sup"], ["sup", "grace", "tiny"]) == ["sup", "grace", "tiny", "dev"]
    assert run_tags(None, None) == []


def test_logger_config_composes_the_derived_tags(tmp_path, monkeypatch):
    from .test_train import make_cfg

    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    cfg = make_cfg(["experiment=none", "backbone=tiny", "reward=unsup", "logger=wandb"], tmp_path)
    assert list(cfg.logger.wandb.run_tags_from_config) == ["unsup", "grace", "tiny"]
    logger = wandb_logger(**{k: v for k, v in cfg.logger.wandb.items() if k != "_target_"})
    assert isinstance(logger, GraceWandbLogger)
    assert logger._wandb_init["tags"][:3] == ["unsup", "grace", "tiny"]
    assert logger._wandb_init["project"] == "grace"


def test_under_a_sweep_agent_no_id_is_set_or_kept(tmp_path, monkeypatch):
    cfg = OmegaConf.create(
        {
            "ckpt_path": None,
            "paths": {"output_dir": str(tmp_path)},
            "logger": {"wandb": {"id": None}},
        }
    )
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw1")
    assert persist_wandb_id(cfg) is None
    assert not (tmp_path / WANDB_ID_FILE).exists() and cfg.logger.wandb.get("id") is None
    monkeypatch.setenv("WANDB_PROJECT", "sweeps")  # `wandb agent <entity>/<project>/<id>` sets it
    logger = wandb_logger(save_dir=str(tmp_path), id="mine", project="grace", entity="me")
    init = logger._wandb_init
    assert init.get("id") is None and init.get("entity") is None and init["project"] == "sweeps"
    monkeypatch.delenv("WANDB_SWEEP_ID")
    assert persist_wandb_id(cfg) and (tmp_path / WANDB_ID_FILE).exists()


def test_finish_wandb_run_without_wandb_or_a_run_is_a_no_op(monkeypatch):
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    assert finish_wandb_run() is False
