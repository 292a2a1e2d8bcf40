"""The embedded default job (issue 11 item 8): `python train.py` = experiment=quickstart."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from grace_lightning.config import ConfigError, validate

from .conftest import DATA_ROOT, ROOT
from .test_train import CONF, make_cfg


def test_python_train_py_is_the_quickstart_preset(tmp_path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(CONF, version_base="1.3"):
        bare = compose("train", overrides=[], return_hydra_config=True)
    # experiment=auto (train.py leaves a bare command line as it is) is the quickstart job
    assert bare.hydra.runtime.choices.experiment == "auto"
    with initialize_config_dir(CONF, version_base="1.3"):
        named = compose("train", overrides=["experiment=quickstart"])
        auto = compose("train", overrides=[])
    assert OmegaConf.to_container(auto) == OmegaConf.to_container(named)
    cfg = make_cfg([], tmp_path, preset="quickstart")
    validate(cfg)
    # GRACE's best recipe in the studies on the embedded model, ~10 minutes of 2 cores, scored on dev data
    assert cfg.backbone.name == "smollm2" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer.max_time == "00:00:09:00" and cfg.trainer.max_steps >= 100
    assert cfg.data.sup.kind == "jsonl" and cfg.callbacks.dev_eval.at_start
    assert cfg.algo.contrastive_weight > 0
    # the preset changes nothing of the paper defaults underneath it
    paper = make_cfg([], tmp_path)
    assert paper.algo.contrastive_weight == 0 and "dev_eval" not in paper.callbacks
    assert paper.trainer.max_steps == 4


def run_tiny_quickstart(run_dir, *overrides: str) -> subprocess.CompletedProcess:
    """``python train.py [overrides]`` on the tiny model for one rollout batch (must succeed)."""
    cmd = [sys.executable, "train.py", *overrides, "backbone=tiny", f"data.root={DATA_ROOT}"]
    cmd += ["data.max_examples=32", "trainer.max_steps=1", "trainer.enable_progress_bar=false"]
    cmd += ["rollout.max_new_tokens=4", "prompt.max_prompt_tokens=96", "reward.truncation=off"]
    cmd += ["callbacks.dev_eval.max_samples=4", "logger=none", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_quickstart_ends_with_the_dev_table(tmp_path):
    """The quickstart job on the tiny model for one rollout batch prints the dev table: the
    untrained model without and with a rationale, then the trained policy."""
    proc = run_tiny_quickstart(tmp_path)
    out = proc.stdout
    assert "Dev score (Spearman x100 of cosine; stsb_dev 4 pairs, sick_trial 4 pairs" in out
    rows = [ln for ln in out.splitlines() if ln.startswith(("base model", "trained"))]
    assert [r.split(",")[0] for r in rows] == ["base model", "base model", "trained"]
    assert (
        "no rationale" in rows[0] and "w/ reasoning" in rows[1] and "1 rollout batches" in rows[2]
    )
    assert "over the untrained model (w/ reasoning)" in out


def test_quickstart_refuses_what_it_would_silently_change(tmp_path):
    """The preset's keys come after every group: over method=infonce it would replace the
    method's lr, over reward=unsup it would run the supervised recipe. Both fail at startup
    with the command that does what was meant."""
    for overrides, says in [
        (["method=infonce"], "`python train.py method=infonce`"),
        (["method=simcse"], "experiment=paper_simcse"),
        (["reward=unsup"], "experiment=quickstart_unsup"),
    ]:
        cfg = make_cfg(overrides, tmp_path, preset="quickstart")
        with pytest.raises(ConfigError, match=re.escape(says)):
            validate(cfg)
    # a contrastive quickstart is one method's recipe: another method over it is refused too
    for preset, overrides, says in [
        ("quickstart_infonce", ["method=simcse"], "`python train.py method=simcse`"),
        ("quickstart_simcse", ["method=infonce"], "`python train.py method=infonce`"),
        ("quickstart_infonce", ["method=grace"], "`python train.py method=grace`"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(says)):
            validate(make_cfg(overrides, tmp_path, preset=preset))
    with pytest.raises(ConfigError, match="experiment=quickstart "):
        validate(make_cfg(["reward=sup"], tmp_path, preset="quickstart_unsup"))
    # the same overrides on the group defaults are fine, and the contrastive lr is the method's
    infonce = make_cfg(["method=infonce"], tmp_path)
    validate(infonce)
    assert infonce.optim.lr == 5e-5


def test_quickstart_unsup_is_the_studys_best_unsup_row(tmp_path):
    cfg = make_cfg([], tmp_path, preset="quickstart_unsup")
    validate(cfg)
    assert cfg.reward.mode == "unsup" and cfg.data.mode == "unsup"
    study = yaml.safe_load((ROOT / "conf" / "study.yaml").read_text())
    row = dict(o.split("=", 1) for o in study["rows"]["grace_unsup_joint"]["train"])
    assert cfg.algo.beta == float(row["algo.beta"]) and cfg.optim.lr == float(row["optim.lr"])
    assert cfg.algo.contrastive_weight == float(row["algo.contrastive_weight"])
    # everything else is the supervised quickstart's (budget, dev scoring, bf16)
    sup = make_cfg([], tmp_path, preset="quickstart")
    assert cfg.trainer == sup.trainer and cfg.rollout == sup.rollout
    assert cfg.callbacks.dev_eval == sup.callbacks.dev_eval


def test_quickstart_unsup_runs_on_the_tiny_model(tmp_path):
    proc = run_tiny_quickstart(tmp_path, "experiment=quickstart_unsup")
    assert "trained, 1 rollout batches" in proc.stdout
    assert (tmp_path / "export" / "grace_config.json").exists()


# ------------------------------------------------------------- contrastive quickstarts
def _study_v3():
    """conf/study_v3.yaml with its out_dir at the recorded results (results/study/v3)."""
    study = OmegaConf.load(ROOT / "conf" / "study_v3.yaml")
    study.out_dir = str(ROOT / "results" / "study" / "v3")
    return study


@pytest.mark.parametrize("method", ["infonce", "simcse"])
def test_python_train_py_method_is_the_studys_contrastive_arm(tmp_path, method):
    """`python train.py method=<m>` on the embedded model is study v3's arm of that method: its
    budget, batch, bf16 and dev scoring, and the lr its recorded dev sweep chose."""
    from grace_lightning.presets import resolve_overrides
    from grace_lightning.study.v3 import chosen_lr

    args = resolve_overrides([f"method={method}"])
    assert args == [f"experiment=quickstart_{method}", f"method={method}"]
    cfg = make_cfg([f"method={method}"], tmp_path, preset=f"quickstart_{method}")
    validate(cfg)
    assert cfg.model.objective == method and cfg.backbone.name == "smollm2"
    assert cfg.reward.mode == ("sup" if method == "infonce" else "unsup")
    study = _study_v3()
    arm = dict(o.split("=", 1) for o in study.contrastive_overrides)
    assert cfg.data.prompts_per_step == int(arm["data.prompts_per_step"])
    assert cfg.trainer.max_steps == -1 and cfg.trainer.max_epochs == -1
    assert cfg.trainer.max_time == f"00:00:{int(study.train_minutes):02d}:00"
    assert cfg.trainer.precision == "bf16-mixed" and cfg.data.sup.kind == "jsonl"
    assert cfg.callbacks.dev_eval.mode == "auto"  # base mode for a contrastive model
    assert cfg.optim.lr == pytest.approx(chosen_lr(study, method))


def test_quickstart_infonce_runs_on_the_tiny_model(tmp_path):
    proc = run_tiny_quickstart(tmp_path, "method=infonce", "data.prompts_per_step=4")
    assert "trained, 1 rollout batches" in proc.stdout and "no rationale" in proc.stdout
    assert (tmp_path / "export" / "grace_config.json").exists()
