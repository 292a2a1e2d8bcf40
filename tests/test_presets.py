"""The preset a command runs (experiment=auto, grace_lightning/presets.py) and the startup
hardware checks: no GPU for a GPU recipe, a recipe the GPU cannot hold (docs/presets.md)."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from grace_lightning.config import ConfigError, validate
from grace_lightning.presets import (
    DEFAULT_CHOICES,
    PAPER_BACKBONES,
    HardwareError,
    PresetError,
    check_hardware,
    resolve_overrides,
    suggest_fits,
)

from .conftest import ROOT
from .test_train import make_cfg

GIB = 2**30
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}


def run_train(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, **ENV, TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ------------------------------------------------------------------------- resolution
@pytest.mark.parametrize(
    "args, want",
    [
        ([], []),  # `python train.py`: the quickstart (auto), composed as before
        (["backbone=qwen", "reward=sup"], ["experiment=paper_sup", "backbone=qwen", "reward=sup"]),
        (
            ["backbone=llama", "reward=unsup"],
            ["experiment=paper_unsup", "backbone=llama", "reward=unsup"],
        ),
        (["backbone=qwen3"], ["experiment=paper_sup", "backbone=qwen3"]),
        (["reward=unsup"], ["experiment=quickstart_unsup", "reward=unsup"]),
        (["backbone=tiny", "reward=sup"], ["backbone=tiny", "reward=sup"]),
        (["method=infonce"], ["experiment=quickstart_infonce", "method=infonce"]),
        (
            ["backbone=tiny", "method=simcse"],
            ["experiment=quickstart_simcse", "backbone=tiny", "method=simcse"],
        ),
        (
            ["backbone=qwen3b", "method=simcse"],
            ["experiment=paper_simcse", "backbone=qwen3b", "method=simcse"],
        ),
        # an explicit experiment always wins; experiment=auto is resolved like no experiment
        (["experiment=none", "backbone=qwen"], ["experiment=none", "backbone=qwen"]),
        (["experiment=auto", "backbone=qwen"], ["experiment=paper_sup", "backbone=qwen"]),
        # flags stay where they are: argparse wants the overrides together
        (
            ["backbone=qwen", "--cfg", "job"],
            ["experiment=paper_sup", "backbone=qwen", "--cfg", "job"],
        ),
        (
            ["--cfg", "job", "backbone=qwen"],
            ["--cfg", "job", "experiment=paper_sup", "backbone=qwen"],
        ),
        # a multirun over the reward becomes a multirun over the presets (each selects its reward)
        (
            ["-m", "backbone=qwen", "reward=sup,unsup"],
            ["-m", "backbone=qwen", "experiment=paper_sup,paper_unsup"],
        ),
        (
            ["-m", "backbone=qwen,llama", "reward=unsup"],
            ["-m", "experiment=paper_unsup", "backbone=qwen,llama", "reward=unsup"],
        ),
    ],
)
def test_auto_resolves_to_the_preset_of_backbone_reward_method(args, want):
    assert resolve_overrides(args) == want


def test_a_sweep_that_mixes_presets_asks_for_an_experiment():
    with pytest.raises(PresetError, match="experiment="):
        resolve_overrides(["-m", "backbone=smollm2,qwen"])
    with pytest.raises(PresetError, match="paper_sup, quickstart"):
        resolve_overrides(["-m", "backbone=smollm2,qwen", "reward=sup"])


def test_default_choices_are_train_yamls():
    defaults = yaml.safe_load((ROOT / "conf" / "train.yaml").read_text())["defaults"]
    choices = {k: v for d in defaults if isinstance(d, dict) for k, v in d.items()}
    for group, value in DEFAULT_CHOICES.items():
        assert choices[group] == value
    assert choices["experiment"] == "auto"
    assert {p.stem for p in (ROOT / "conf" / "backbone").glob("*.yaml")} >= set(PAPER_BACKBONES)


# ------------------------------------------------------------------- the composed recipe
def test_the_mission_command_is_the_paper_recipe():
    """`python train.py backbone=qwen reward=sup --cfg job`: upstream train.sh with a horizon."""
    proc = run_train("backbone=qwen", "reward=sup", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["rollout"]["num_generations"] == 8 and cfg["rollout"]["max_new_tokens"] == 2048
    assert cfg["data"]["prompts_per_step"] == 64 and cfg["algo"]["prompts_per_minibatch"] == 16
    assert cfg["optim"]["lr"] == 1e-6 and cfg["reward"]["mode"] == "sup"
    t = cfg["trainer"]
    assert t["accelerator"] == "gpu" and t["precision"] == "bf16-mixed"
    assert t.get("max_time") is None  # no wall-time budget
    # a finite horizon: 1,000 rollout batches of 64 / 16 = 4 optimiser steps
    assert t["max_steps"] == 1000 * 64 // 16
    assert cfg["data"]["sup"]["kind"] == "jsonl" and "dev_eval" not in cfg["callbacks"]
    assert cfg["callbacks"]["model_checkpoint"]["every_n_rollout_batches"] == 200


@pytest.mark.parametrize("backbone", PAPER_BACKBONES)
@pytest.mark.parametrize("reward", ["sup", "unsup"])
def test_every_paper_backbone_and_reward_composes_the_paper_preset(backbone, reward, tmp_path):
    cfg = make_cfg(resolve_overrides([f"backbone={backbone}", f"reward={reward}"]), tmp_path)
    validate(cfg)
    assert cfg.hydra.runtime.choices.experiment == f"paper_{reward}"
    assert cfg.reward.mode == reward and cfg.backbone.name == backbone
    assert cfg.rollout.num_generations == 8 and cfg.trainer.max_steps == 4000


def test_auto_composed_without_train_py_refuses_a_paper_backbone(tmp_path):
    """The compose API does not run train.py's resolution: `auto` is the quickstart there, and a
    paper backbone on it says which experiment to add."""
    with pytest.raises(ConfigError, match="experiment=paper_unsup"):
        validate(make_cfg(["backbone=qwen", "reward=unsup"], tmp_path, preset="auto"))
    validate(make_cfg([], tmp_path, preset="auto"))  # the quickstart itself is fine


# --------------------------------------------------------------------------- hardware
class FakeCuda:
    """torch.cuda's queries the startup check makes."""

    def __init__(self, gpus: int = 0, gib: float = 80.0):
        self.gpus, self.total = gpus, int(gib * GIB)

    def is_available(self) -> bool:
        return self.gpus > 0

    def device_count(self) -> int:
        return self.gpus

    def get_device_properties(self, i: int):
        assert 0 <= i < self.gpus
        return SimpleNamespace(total_memory=self.total)


def paper_cfg(tmp_path, *extra: str):
    return make_cfg(resolve_overrides(["backbone=qwen", "reward=sup", *extra]), tmp_path)


def test_no_gpu_stops_with_one_line_the_estimate_and_the_short_job(tmp_path, monkeypatch):
    import grace_lightning.presets as presets

    monkeypatch.setattr(presets, "cpu_gflops", lambda cfg: 100.0)  # no timing in a test
    cfg = paper_cfg(tmp_path)
    with pytest.raises(HardwareError) as err:
        check_hardware(cfg, FakeCuda(gpus=0))
    msg = str(err.value)
    assert "\n" not in msg  # one line
    assert "64 prompts x 8 rollouts x 2048 new tokens" in msg and "1000 rollout batches" in msg
    assert "a rollout batch on this CPU" in msg and "PFLOP" in msg
    assert "`python train.py`" in msg and "allow_cpu=true" in msg
    # the FLOP model: one rollout batch of Qwen2.5-1.5B (64 x 8 rollouts + 128 anchors, 2048
    # tokens each; update = 3 forward passes) is ~1.5e16 FLOPs: at 100 GFLOP/s, ~41 hours
    est = presets.step_estimate(cfg, 100.0)
    assert 1.2e16 < est["flops"] < 1.8e16
    assert f"~{est['seconds'] / 3600:.0f} h a rollout batch" in msg
    # forced: the same recipe runs on the CPU
    cfg = paper_cfg(tmp_path, "allow_cpu=true")
    check_hardware(cfg, FakeCuda(gpus=0))
    assert cfg.trainer.accelerator == "cpu"


def test_no_gpu_for_a_contrastive_baseline_names_its_own_step_and_short_job(tmp_path, monkeypatch):
    """paper_infonce / paper_simcse on a machine without a GPU: the line describes the baseline
    (texts a step, epochs; no rollouts) with its own FLOP estimate and its own quickstart."""
    import grace_lightning.presets as presets

    monkeypatch.setattr(presets, "cpu_gflops", lambda cfg: 100.0)
    for method, unit, epochs in [
        ("infonce", "64 triplets a step", "3 epochs"),  # SimCSE sup: 3 epochs
        ("simcse", "64 sentences (two views each) a step", "1 epoch,"),  # SimCSE unsup: 1
    ]:
        cfg = make_cfg(resolve_overrides(["backbone=qwen", f"method={method}"]), tmp_path)
        with pytest.raises(HardwareError) as err:
            check_hardware(cfg, FakeCuda(gpus=0))
        msg = str(err.value)
        assert f"method={method} (experiment=paper_{method})" in msg and unit in msg
        assert epochs in msg and "rollout" not in msg
        assert f"`python train.py method={method}`" in msg
        # forward + backward (2x) over every text, no LM head: Qwen2.5-1.5B's 28 layers of
        # ~46M linear parameters, 64 x 3 InfoNCE texts (SimCSE: 64 x 2 views) of 128 tokens
        texts = 64 * (3 if method == "infonce" else 2)
        body = 3 * 2 * 28 * 46.3e6 * texts * 128
        est = presets.step_estimate(cfg, 100.0)
        assert body < est["flops"] < 1.2 * body
        assert f"~{presets._duration(est['seconds'])} a step on this CPU" in msg


def test_the_cli_names_bad_data_in_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"anchor": "a", "positive": "b", "hard_negative": "c"}\n{"anchor": "q"}\n')
    proc = run_train(
        "experiment=none",
        "backbone=tiny",
        "reward=sup",
        "data=shared",
        f"data.sup.path={bad}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]  # after Lightning's "Seed set"
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr, proc.stderr
    assert lines[-1] == f"error: {bad}:2: field 'positive': missing", proc.stderr[-2000:]


def test_the_cli_names_a_bad_config_value_in_one_line(tmp_path):
    proc = run_train(
        "experiment=none", "backbone=tiny", "trainer.max_steps=abc", f"hydra.run.dir={tmp_path}"
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == ["error: trainer.max_steps: expected an integer, got 'abc'"], proc.stderr


def test_a_bad_multirun_job_fails_alone(tmp_path):
    # the launcher records the failed job and still runs the next one (a one-line exit would
    # end the whole sweep at the first bad job)
    proc = run_train(
        "-m",
        "experiment=none",
        "backbone=tiny",
        "trainer.max_steps=abc,xyz",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert proc.returncode != 0
    assert "trainer.max_steps: expected an integer, got 'abc'" in proc.stderr
    assert (tmp_path / "0").is_dir() and (tmp_path / "1").is_dir(), sorted(tmp_path.iterdir())


def test_cpu_recipes_never_ask_for_a_gpu(tmp_path):
    check_hardware(make_cfg([], tmp_path, preset="auto"), FakeCuda(gpus=0))
    check_hardware(make_cfg(["trainer=ddp_cpu"], tmp_path), FakeCuda(gpus=0))


def test_the_cli_exits_cleanly_without_a_gpu(tmp_path):
    proc = run_train("backbone=qwen", "reward=sup", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("No GPU here"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_recipe_that_fits_the_gpu_starts(tmp_path):
    # Qwen2.5-1.5B full fine-tuning, the paper recipe, on one 80 GB GPU (docs/scale.md)
    check_hardware(paper_cfg(tmp_path), FakeCuda(gpus=1, gib=79.6))


def test_a_recipe_too_big_for_the_gpu_stops_with_the_command_that_fits(tmp_path, monkeypatch):
    """Qwen3-4B full fine-tuning does not fit one 80 GB GPU by the memory model; the check stops
    before any weights load and names a command that fits by the same model."""
    from grace_lightning import scale

    cfg = make_cfg(resolve_overrides(["backbone=qwen3", "reward=sup"]), tmp_path)
    with pytest.raises(HardwareError) as err:
        check_hardware(cfg, FakeCuda(gpus=1, gib=79.6))
    msg = str(err.value)
    assert "by the memory model" in msg and "python train.py backbone=qwen3 reward=sup" in msg
    fix = msg.split("What fits by the same model: `")[1].split("`")[0]
    fixed = make_cfg(resolve_overrides(fix.split()[2:]), tmp_path)
    assert scale.predict_config_peak(fixed, 1) <= scale.usable_memory(79.6 * GIB)
    # a small GPU stops even the 1.5B recipe; memory_check=false skips the check
    with pytest.raises(HardwareError, match="more than the"):
        check_hardware(paper_cfg(tmp_path), FakeCuda(gpus=1, gib=24))
    check_hardware(paper_cfg(tmp_path, "memory_check=false"), FakeCuda(gpus=1, gib=24))


def test_a_contrastive_baseline_too_big_stops_with_a_contrastive_fix(tmp_path):
    """InfoNCE on Llama-3.2-3B, 64 triplets of texts up to 512 tokens in one forward, does not
    fit one 80 GB GPU by the memory model: the fixes tried are the baseline's own (shorter
    texts, FSDP), never the rollout knobs it does not read; the suggested command fits."""
    from grace_lightning import scale

    args = ["backbone=llama", "method=infonce", "model.max_text_tokens=512"]  # LLM2Vec's
    cfg = make_cfg(resolve_overrides(args), tmp_path)
    with pytest.raises(HardwareError) as err:
        check_hardware(cfg, FakeCuda(gpus=1, gib=79.6))
    msg = str(err.value)
    assert "64 triplets a step" in msg and "rollout" not in msg
    fix = msg.split("What fits by the same model: `")[1].split("`")[0]
    assert fix == "python train.py backbone=llama method=infonce model.max_text_tokens=256"
    fixed = make_cfg(resolve_overrides(fix.split()[2:]), tmp_path)
    assert scale.predict_config_peak(fixed, 1) <= scale.usable_memory(79.6 * GIB)
    # on 4 visible GPUs FSDP is offered as well; the preset (256-token texts) fits as it is
    fixes = suggest_fits(cfg, 1, 4, scale.usable_memory(79.6 * GIB), scale.predict_config_peak)
    assert any("trainer=fsdp trainer.devices=4" in f for f in fixes)
    preset = make_cfg(resolve_overrides(args[:2]), tmp_path)
    check_hardware(preset, FakeCuda(gpus=1, gib=79.6))


def test_train_checks_the_hardware_before_anything_loads(tmp_path, monkeypatch):
    """train() stops at the check: no data read, no tokenizer, no weights."""
    import torch

    import grace_lightning.train as train_mod

    fake = FakeCuda(gpus=1, gib=24)
    monkeypatch.setattr(torch.cuda, "is_available", fake.is_available)
    monkeypatch.setattr(torch.cuda, "device_count", fake.device_count)
    monkeypatch.setattr(torch.cuda, "get_device_properties", fake.get_device_properties)

    def loaded(*a, **k):
        raise AssertionError("something loaded before the hardware check")

    monkeypatch.setattr(train_mod, "load_tokenizer", loaded)
    monkeypatch.setattr(train_mod.hydra.utils, "instantiate", loaded)
    with pytest.raises(HardwareError, match="GiB"):
        train_mod.train(paper_cfg(tmp_path))


# ------------------------------------------------------------------ the prepared GPU check
def test_gpu_check_script_runs_its_train_piece_on_the_cpu():
    """bench/gpu_checks.sh's first piece, `python train.py backbone=qwen reward=sup` itself with
    a random-init Qwen2 model (tiny width here), runs its rollout batches and reports per phase;
    the script itself parses (its GPU path needs a GPU: bench/gpu_checks.sh)."""
    import os

    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_checks.sh")]).returncode == 0
    env = dict(os.environ, **ENV, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "bench/gpu_train_check.py", "--cpu-smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "python train.py backbone=qwen reward=sup backbone.init=random" in out
    assert "2 rollout batches in" in out and "generated tokens/s" in out
    for phase in ("rollout", "update", "optim_step"):
        assert f"  {phase} " in out
    assert "Qwen2ForCausalLM" in out  # the paper backbone's architecture, not the tiny Llama
