"""The small-scale study (`python study.py`): config checks, commands, resume, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from grace_lightning.study.report import (
    README_BEGIN,
    README_END,
    read_metrics,
    samples_markdown,
    series,
    update_readme,
)
from grace_lightning.study.stages import StudyConfigError, check_rows, plan, run_study

from .conftest import DATA_ROOT, ROOT


def study_cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="study",
            overrides=[
                f"out_dir={tmp_path / 'study'}",
                f"report_dir={tmp_path / 'report'}",
                "update_readme=false",
                *overrides,
            ],
        )
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.log_dir = str(tmp_path)
    return cfg


def test_config_rows_are_checked_with_the_key_to_change():
    good = {"label": "B", "tables": ["sup"], "eval": {"mode": "base"}}
    check_rows({"base": good})
    cases = [
        ({**good, "eval": {"mode": "mean"}}, "rows.x.eval.mode"),
        ({**good, "tables": ["both"]}, "rows.x.tables"),
        ({**good, "train": ["reward=sup"]}, "rows.x.group"),
        ({**good, "group": "grace", "train": "reward=sup"}, "rows.x.train"),
        ({**good, "labels": "typo"}, "unknown field"),
        (
            {**good, "group": "grace", "train": [], "eval": {"mode": "base", "model": "qwen"}},
            "rows.x.eval.model",
        ),
    ]
    for row, message in cases:
        with pytest.raises(StudyConfigError, match=message.replace(".", r"\.")):
            check_rows({"x": row})


def test_plan_orders_overrides_and_evaluates_trained_rows_on_their_run(tmp_path):
    cfg = study_cfg(tmp_path)
    stages = plan(cfg)
    names = [(s.row, s.kind) for s in stages]
    assert names[:3] == [("base", "eval"), ("reasoning", "eval"), ("reasoning", "samples")]
    assert ("grace_sup", "train") in names and ("simcse", "train") in names
    assert ("base", "samples") not in names  # base mode has no rationales
    train = next(s for s in stages if s.row == "grace_sup_per_rollout" and s.kind == "train")
    args = train.argv[2:]
    # shared -> group -> row -> extras: the row's own overrides come after the group's
    assert args.index("rollout.num_generations=4") < args.index("reward.negative_mode=per_rollout")
    assert args[-1] == f"hydra.run.dir={tmp_path / 'study' / 'grace_sup_per_rollout' / 'train'}"
    ev = next(s for s in stages if s.row == "grace_sup_per_rollout" and s.kind == "eval")
    assert f"model={train.dir}" in ev.argv and "mode=rationale" in ev.argv
    base = next(s for s in stages if s.row == "base")
    assert "model=smollm2" in base.argv and "mode=base" in base.argv
    with pytest.raises(StudyConfigError, match="only=\\['nope'\\]"):
        plan(study_cfg(tmp_path, "only=[nope]"))


def test_series_keeps_first_value_per_step_and_skips_gaps(tmp_path):
    d = tmp_path / "csv" / "version_0"
    d.mkdir(parents=True)
    (d / "metrics.csv").write_text("step,reward,lr\n0,,1e-6\n0,0.5,\n1,0.7,\n1,0.9,\n2,,1e-6\n")
    metrics = read_metrics(tmp_path)
    assert series(metrics, "reward") == ([0, 1], [0.5, 0.7])
    assert series(metrics, "missing") == ([], [])


def test_samples_markdown_and_readme_markers(tmp_path):
    rec = lambda label, r: {  # noqa: E731
        "label": label,
        "samples": {"samples": [{"text": "A cat.", "rationale": r}]},
    }
    md = samples_markdown([rec("before", "It is a\ncat | pet."), rec("after", "A feline.")])
    assert "*Text:* A cat." in md
    assert "- **before**: It is a cat \\| pet." in md and "- **after**: A feline." in md
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nold table\n{README_END}\noutro\n")
    assert update_readme(readme, "new table")
    assert readme.read_text() == f"intro\n{README_BEGIN}\nnew table\n{README_END}\noutro\n"
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    assert not update_readme(plain, "x") and plain.read_text() == "no markers\n"


@pytest.mark.skipif(not DATA_ROOT.is_dir(), reason="needs ../shared/data")
def test_tiny_study_runs_resumes_and_reports(tmp_path, capsys):
    """Two rows end to end on the tiny model (train.py + eval.py subprocesses), then a rerun that
    skips finished stages and redoes only the one whose DONE.json is gone."""
    cfg = study_cfg(
        tmp_path,
        "base_model=tiny",
        "only=[base,grace_sup]",
        "max_new_tokens=4",
        "samples.texts=[A man plays a guitar.]",
        "train_extra=['trainer.max_steps=2','data.max_examples=16',"
        "'callbacks.model_checkpoint.every_n_train_steps=1']",
        "eval_extra=['tasks=[LocalSTS12]','eval.max_samples=8']",
    )
    run_study(cfg)
    out = tmp_path / "study"
    for stage in ("base/eval", "grace_sup/train", "grace_sup/eval"):
        assert (out / stage / "DONE.json").is_file(), stage
    assert (out / "grace_sup" / "train" / "export" / "grace_config.json").is_file()
    samples = json.loads((out / "grace_sup" / "samples.json").read_text())
    assert samples["samples"][0]["text"] == "A man plays a guitar."
    report = (tmp_path / "report" / "study.md").read_text()
    assert "| Base |" in report and "| GRACE (paper reward) |" in report
    assert "LocalSTS12" in report
    assert (tmp_path / "report" / "reward_curves.png").stat().st_size > 0
    assert (tmp_path / "report" / "rationale_length.png").stat().st_size > 0
    csv_lines = (tmp_path / "report" / "results.csv").read_text().splitlines()
    assert (
        csv_lines[0].startswith("table,row,label") and len(csv_lines) == 1 + 3
    )  # base in both tables

    # rerun: nothing is redone except the stage without DONE.json
    (out / "grace_sup" / "eval" / "DONE.json").unlink()
    run_study(cfg)
    attempts = lambda stage: len((out / stage / "attempts.jsonl").read_text().splitlines())  # noqa: E731
    assert attempts("base/eval") == 1 and attempts("grace_sup/train") == 1
    assert attempts("grace_sup/eval") == 2
    assert json.loads((out / "grace_sup/eval/DONE.json").read_text())["attempts"] == 2


def test_stopping_the_study_stops_the_running_stage(tmp_path):
    """SIGTERM to the study ends its stage subprocess too (no orphan keeps writing a run dir)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    sleeper = (
        f"import os,time; open({str(pid_file)!r},'w').write(str(os.getpid())); time.sleep(120)"
    )
    driver = (
        "import sys; from grace_lightning.study.stages import _call; "
        f"_call([sys.executable, '-c', {sleeper!r}], dict(__import__('os').environ), None)"
    )
    study = subprocess.Popen([sys.executable, "-c", driver], cwd=ROOT)
    for _ in range(200):
        if pid_file.is_file() and pid_file.read_text():
            break
        time.sleep(0.05)
    child = int(pid_file.read_text())
    study.send_signal(signal.SIGTERM)
    assert study.wait(timeout=30) == 128 + signal.SIGTERM
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the stage subprocess outlived the study")
