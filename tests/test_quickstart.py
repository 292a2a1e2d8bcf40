"""The embedded default job (issue 11 item 8): `python train.py` = experiment=quickstart."""

from __future__ import annotations

import subprocess
import sys

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from grace_lightning.config import validate

from .conftest import DATA_ROOT, ROOT
from .test_train import CONF, make_cfg


def test_python_train_py_is_the_quickstart_preset(tmp_path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(CONF, version_base="1.3"):
        bare = compose("train", overrides=[], return_hydra_config=True)
    assert bare.hydra.runtime.choices.experiment == "quickstart"
    cfg = make_cfg([], tmp_path, preset="quickstart")
    validate(cfg)
    # the study's best recipe on the embedded model, ~10 minutes of 2 cores, scored on dev data
    assert cfg.backbone.name == "smollm2" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer.max_time == "00:00:09:00" and cfg.trainer.max_steps >= 100
    assert cfg.data.sup.kind == "jsonl" and cfg.callbacks.dev_eval.at_start
    assert cfg.algo.contrastive_weight > 0
    # the preset changes nothing of the paper defaults underneath it
    paper = make_cfg([], tmp_path)
    assert paper.algo.contrastive_weight == 0 and "dev_eval" not in paper.callbacks
    assert paper.trainer.max_steps == 4


def test_quickstart_ends_with_the_dev_table(tmp_path):
    """The quickstart job on the tiny model for one rollout batch prints the dev table: the
    untrained model without and with a rationale, then the trained policy."""
    cmd = [
        sys.executable,
        "train.py",
        "backbone=tiny",
        f"data.root={DATA_ROOT}",
        "data.max_examples=32",
        "trainer.max_steps=1",
        "trainer.enable_progress_bar=false",
        "rollout.max_new_tokens=4",
        "prompt.max_prompt_tokens=96",
        "reward.truncation=off",
        "callbacks.dev_eval.max_samples=4",
        "logger=none",
        f"hydra.run.dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "Dev score (Spearman x100 of cosine; stsb_dev 4 pairs, sick_trial 4 pairs" in out
    rows = [ln for ln in out.splitlines() if ln.startswith(("base model", "trained"))]
    assert [r.split(",")[0] for r in rows] == ["base model", "base model", "trained"]
    assert (
        "no rationale" in rows[0] and "w/ reasoning" in rows[1] and "1 rollout batches" in rows[2]
    )
    assert "over the untrained model (w/ reasoning)" in out
