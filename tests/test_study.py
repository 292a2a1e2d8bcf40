"""The small-scale study (`python study.py`): config checks, commands, resume, report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from grace_lightning.eval.bootstrap import load_examples
from grace_lightning.study.report import (
    README_BEGIN,
    README_END,
    read_metrics,
    samples_markdown,
    series,
    update_readme,
)
from grace_lightning.study.stages import (
    StudyConfigError,
    budget_lines,
    check_rows,
    has_weights,
    plan,
    redo_changed_choice,
    restore_records,
    run_study,
    selected_rows,
)

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
        cfg.record_dir = str(tmp_path / "records")  # never the repo's results/
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
        ({**good, "init_from": "base"}, "rows.x: init_from / minutes / lr_from need a trained row"),
        (
            {**good, "group": "grace", "train": [], "init_from": "nope"},
            "rows.x.init_from: 'nope' is not another row",
        ),
        ({**good, "group": "grace", "train": [], "minutes": 0}, "rows.x.minutes"),
        (
            {**good, "group": "grace", "train": [], "eval": {"mode": "base", "model": "qwen"}},
            "rows.x.eval.model",
        ),
    ]
    for row, message in cases:
        pattern = message.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")
        with pytest.raises(StudyConfigError, match=pattern):
            check_rows({"x": row})
    # init_from must name a trained row, and chains must not loop
    trained = {**good, "group": "contrastive", "train": ["method=infonce"]}
    with pytest.raises(StudyConfigError, match="trains nothing"):
        check_rows({"base": good, "x": {**trained, "init_from": "base"}})
    with pytest.raises(StudyConfigError, match="cycle"):
        check_rows({"a": {**trained, "init_from": "b"}, "b": {**trained, "init_from": "a"}})


def test_plan_orders_overrides_and_evaluates_trained_rows_on_their_run(tmp_path):
    cfg = study_cfg(tmp_path)
    stages = plan(cfg)
    names = [(s.row, s.kind) for s in stages]
    assert names[:4] == [
        ("base", "eval"),
        ("base", "general"),
        ("reasoning", "eval"),
        ("reasoning", "samples"),
    ]
    for row in ("infonce", "grace_sup", "grace_sup_joint", "two_stage", "simcse", "grace_unsup"):
        assert (row, "train") in names and (row, "general") in names, row
    assert ("base", "samples") not in names  # base mode has no rationales
    out = tmp_path / "study"
    train = next(s for s in stages if s.row == "grace_sup_joint" and s.kind == "train")
    args = train.argv[2:]
    # shared -> speed-ups -> dev -> group -> row -> budget -> extras: the row's own come later
    assert args.index("trainer=cpu_bf16") < args.index("rollout.num_generations=4")
    assert args.index("rollout.num_generations=4") < args.index("algo.contrastive_weight=0.5")
    minutes = int(cfg.train_minutes)
    assert f"++trainer.max_time='00:00:{minutes:02d}:00'" in args  # equal wall-time budget
    assert args[args.index("backbone=smollm2") + 1] == "experiment=none"  # not the quickstart
    assert args[-1] == f"hydra.run.dir={out / 'grace_sup_joint' / 'train'}"
    ev = next(s for s in stages if s.row == "grace_sup_joint" and s.kind == "eval")
    assert ev.argv[1:3] == ["-m", "grace_lightning.study.eval_stage"]  # eval.py + per-example
    assert f"model={train.dir}" in ev.argv and "mode=rationale" in ev.argv
    assert "eval=study" in ev.argv
    gen = next(s for s in stages if s.row == "grace_sup_joint" and s.kind == "general")
    assert gen.argv[3] == str(train.dir / "export")
    # stage dependency: the two-stage row starts from the InfoNCE row's export, after it
    two = next(s for s in stages if s.row == "two_stage" and s.kind == "train")
    assert f"init_from={out / 'infonce' / 'train' / 'export'}" in two.argv
    assert names.index(("infonce", "train")) < names.index(("two_stage", "train"))
    base = next(s for s in stages if s.row == "base" and s.kind == "eval")
    assert "model=smollm2" in base.argv and "mode=base" in base.argv
    with pytest.raises(StudyConfigError, match="only=\\['nope'\\]"):
        plan(study_cfg(tmp_path, "only=[nope]"))
    # `only` pulls in the rows a row starts from; the budget lists each row's minutes
    only = study_cfg(tmp_path, "only=[two_stage]")
    assert list(selected_rows(only)) == ["infonce", "two_stage"]
    lines = budget_lines(only, selected_rows(only))
    m, est = float(only.train_minutes), only.eval_minutes_estimate
    assert lines[1].split()[:2] == ["infonce", f"{m:.1f}"] and lines[2].split()[-1] == "infonce"
    assert lines[-1].split()[:2] == ["total", f"{m + est.base + m + est.rationale:.1f}"]


def test_v1_config_still_plans_with_eval_py(tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="study_v1", overrides=[f"out_dir={tmp_path}"])
    stages = plan(cfg)
    ev = next(s for s in stages if s.kind == "eval")
    assert ev.argv[1].endswith("eval.py") and not any(s.kind == "general" for s in stages)


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


@pytest.mark.slow  # 7 subprocesses (train x2, eval x2 + a resumed one, general x2)
@pytest.mark.skipif(not DATA_ROOT.is_dir(), reason="needs ../shared/data")
def test_tiny_study_runs_resumes_and_reports(tmp_path, capsys):
    """The two-stage row on the tiny model end to end (train.py, the eval stage and the general
    proxy as subprocesses): `only=[two_stage]` runs the InfoNCE row first and starts from its
    export; per-example data reproduce mteb's scores; the report has intervals; a rerun skips
    finished stages and redoes only the one whose DONE.json is gone."""
    cfg = study_cfg(
        tmp_path,
        "base_model=tiny",
        "only=[two_stage]",
        "max_new_tokens=4",
        "train_minutes=5",
        "samples.texts=[A man plays a guitar.]",
        "bootstrap.n=50",
        "general.args=[--max-texts,2,--max-tokens,16,--max-new-tokens,2]",
        "train_extra=['trainer.max_steps=2','data.max_examples=16','data.prompts_per_step=4',"
        "'callbacks.dev_eval.max_samples=4','callbacks.model_checkpoint.every_n_rollout_batches=1']",
        "eval_extra=['tasks=[LocalSTS12,LocalSciFactTrain,LocalTRECClassification]',"
        "'eval.max_samples=8','eval.n_experiments=2',"
        # fp32: bf16 vectors move with the batch's padding (~1e-3), and the rerun below
        # re-encodes in other batches than the first pass
        "'precision=fp32']",
    )
    run_study(cfg)
    out = tmp_path / "study"
    for stage in ("infonce/train", "infonce/eval", "two_stage/train", "two_stage/eval"):
        assert (out / stage / "DONE.json").is_file(), stage
    # finished train stages keep export/ (what later stages load), not checkpoints/
    for row in ("infonce", "two_stage"):
        assert (out / row / "train" / "export").is_dir()
        assert not (out / row / "train" / "checkpoints").exists(), row
    for row in ("infonce", "two_stage"):
        general = json.loads((out / row / "general" / "general.json").read_text())
        assert general["perplexity"] > 1 and 0 <= general["keyword_acc"] <= 1
    # the two-stage policy started from the InfoNCE export, within the wall-time budget
    resolved = (out / "two_stage" / "train" / ".hydra" / "config.yaml").read_text()
    assert f"init_from: {out / 'infonce' / 'train' / 'export'}" in resolved
    assert "pretrained: ${init_from}" in resolved  # conf/experiment/two_stage_sup.yaml
    assert "max_time:" in resolved and "00:00:05:00" in resolved
    # per-example data: STS / retrieval / classification recomputed = mteb's reported score
    for row in ("infonce", "two_stage"):
        ex = load_examples(out / row / "eval" / "per_example.json")
        assert sorted(ex) == ["LocalSTS12", "LocalSciFactTrain", "LocalTRECClassification"]
        for e in ex.values():
            # mteb stores its scores rounded to 4 decimals (x100: 2 decimals)
            assert e.n == 8 and e.extra["recomputed"] == pytest.approx(e.reported, abs=0.006)
    a = load_examples(out / "infonce" / "eval" / "per_example.json")
    b = load_examples(out / "two_stage" / "eval" / "per_example.json")
    assert all(a[t].key == b[t].key for t in a)  # same examples: paired
    samples = json.loads((out / "two_stage" / "samples.json").read_text())
    assert samples["samples"][0]["text"] == "A man plays a guitar."
    report = (tmp_path / "report" / "study.md").read_text()
    assert "| w/ InfoNCE (contrastive FT) |" in report and "| InfoNCE, then GRACE |" in report
    assert "[95% CI]" in report and "Δ vs w/ InfoNCE (contrastive FT)" in report
    assert "Tasks with per-example data: 3 of 3" in report and "LocalSTS12" in report
    boot = json.loads((tmp_path / "report" / "bootstrap.json").read_text())
    lo, hi = boot["two_stage"]["diff"]["infonce"]["ci"]
    assert lo <= boot["two_stage"]["diff"]["infonce"]["delta"] <= hi
    assert (tmp_path / "report" / "reward_curves.png").stat().st_size > 0
    csv_lines = (tmp_path / "report" / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("table,row,label") and len(csv_lines) == 1 + 2
    assert "Study budget" in capsys.readouterr().out

    # rerun: nothing is redone except the stage without DONE.json; its per-example data come
    # back although mteb skips its finished tasks (embeddings encoded again)
    (out / "two_stage" / "eval" / "DONE.json").unlink()
    (out / "two_stage" / "eval" / "per_example.json").unlink()
    run_study(cfg)
    attempts = lambda stage: len((out / stage / "attempts.jsonl").read_text().splitlines())  # noqa: E731
    assert attempts("infonce/train") == 1 and attempts("two_stage/train") == 1
    assert attempts("infonce/eval") == 1 and attempts("two_stage/eval") == 2
    assert json.loads((out / "two_stage/eval/DONE.json").read_text())["attempts"] == 2
    again = load_examples(out / "two_stage" / "eval" / "per_example.json")
    for t, e in b.items():
        np.testing.assert_allclose(again[t].a, e.a, atol=1e-5)


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


def test_report_has_intervals_general_columns_and_collapse_and_dev_panels(tmp_path):
    """build_report on hand-made stage outputs (no subprocess): the table shows each Avg's
    interval, the difference to the reference row and the general proxy; collapse/* and
    val/dev_avg columns of metrics.csv get their own figures; the budget shows max_time."""
    from omegaconf import OmegaConf

    from grace_lightning.eval.bootstrap import TaskExamples, save_examples
    from grace_lightning.eval.report import summarize
    from grace_lightning.study.report import build_report

    out = tmp_path / "study"
    rng = np.random.default_rng(0)
    gold = rng.random(120)
    rows = {
        "infonce": {
            "label": "InfoNCE",
            "tables": ["sup"],
            "group": "contrastive",
            "train": ["method=infonce"],
            "eval": {"mode": "base"},
        },
        "grace": {
            "label": "GRACE",
            "tables": ["sup"],
            "group": "grace",
            "train": ["reward=sup"],
            "eval": {"mode": "rationale"},
        },
    }
    for i, (name, noise) in enumerate((("infonce", 0.1), ("grace", 0.6))):
        ev = out / name / "eval"
        ev.mkdir(parents=True)
        ex = TaskExamples("LocalSTS12", "STS", "spearman", gold + noise * rng.random(120), gold)
        tasks = [{"task": "LocalSTS12", "category": "STS", "main_score": "s", "score": ex.score()}]
        run = {"label": rows[name]["label"], "tasks": tasks, **summarize(tasks)}
        (ev / "scores.json").write_text(json.dumps(run))
        (ev / "DONE.json").write_text(json.dumps({"seconds_all_attempts": 60}))
        save_examples(ev / "per_example.json", {"LocalSTS12": ex})
        gen = out / name / "general"
        gen.mkdir(parents=True)
        (gen / "general.json").write_text(json.dumps({"perplexity": 20.0 + i, "keyword_acc": 0.5}))
        (gen / "DONE.json").write_text("{}")
    train = out / "grace" / "train"
    (train / ".hydra").mkdir(parents=True)
    (train / ".hydra" / "config.yaml").write_text(
        "model: {_target_: grace_lightning.module.GraceModule}\n"
        "trainer: {max_steps: 400, max_time: '00:00:12:00'}\n"
        "algo: {prompts_per_minibatch: 4}\nrollout: {num_generations: 4, max_new_tokens: 4}\n"
        "data: {mode: sup}\noptim: {lr: 1.0e-5}\npeft: null\n"
    )
    (train / "DONE.json").write_text(json.dumps({"seconds_all_attempts": 720}))
    metrics = train / "csv" / "version_0"
    metrics.mkdir(parents=True)
    lines = ["step,reward,collapse/cross_group_cosine,collapse/distinct_2,val/dev_avg"]
    lines += [f"{s},{0.1 * s},{0.5 + 0.01 * s},{0.9 - 0.01 * s},{40 + s}" for s in range(10)]
    (metrics / "metrics.csv").write_text("\n".join(lines) + "\n")
    cfg = OmegaConf.create(
        {
            "out_dir": str(out),
            "max_new_tokens": 4,
            "bootstrap": {"n": 200, "seed": 0, "level": 0.95, "references": ["infonce"]},
        }
    )
    report_dir = tmp_path / "report"
    block = build_report(cfg, rows, report_dir)
    grace_line = next(line for line in block.splitlines() if line.startswith("| GRACE |"))
    boot = json.loads((report_dir / "bootstrap.json").read_text())
    lo, hi = boot["grace"]["diff"]["infonce"]["ci"]
    assert hi < 0  # the noisier model is clearly worse, and its interval says so
    assert f"[{lo:.2f}, {hi:.2f}]" in grace_line and "21.0" in grace_line  # Δ CI, perplexity
    assert "Δ vs InfoNCE [95% CI]" in block and "PPL" in block
    assert "Tasks with per-example data: 1 of 1" in block
    # budget: 12-minute wall-time budget, 10 optimiser steps taken (cap 400), 12 min spent
    budget = next(line for line in block.splitlines() if line.startswith("| GRACE | GRACE"))
    assert "| 10 | 40 (160) |" in budget and "| 12 | 12 |" in budget
    for png in ("collapse.png", "dev_score.png", "reward_curves.png"):
        assert (report_dir / png).stat().st_size > 0, png
    assert "collapse.png" in block and "dev_score.png" in block
    # study.md sits beside its figures (bare names, as mkdocs and GitHub resolve them); the
    # returned block is for README.md at the repo root
    page = (report_dir / "study.md").read_text()
    assert "![collapse metrics](collapse.png)" in page
    assert f"![collapse metrics]({report_dir}/collapse.png)" in block  # tmp: outside the repo
    csv_row = (report_dir / "results.csv").read_text().splitlines()[2].split(",")
    assert [float(x) for x in csv_row[-2:]] == [round(x, 2) for x in boot["grace"]["avg_ci"]]


@pytest.mark.parametrize("config_name", ["study", "study_v1", "study_collapse"])
def test_every_train_stage_composes_and_validates(config_name, tmp_path):
    """Each row's train.py command is a valid training config: what the study runs is what its
    rows say (study_v1 once ran on top of `python train.py`'s quickstart preset)."""
    from hydra.core.global_hydra import GlobalHydra

    from grace_lightning.config import validate

    from .test_train import make_cfg

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        study = compose(config_name=config_name, overrides=[f"out_dir={tmp_path}"])
    stages = [s for s in plan(study) if s.kind == "train"]
    assert stages
    for stage in stages:
        overrides = [
            o for o in stage.argv[2:] if not o.startswith(("hydra.run.dir=", "init_from="))
        ]
        # what train.py composes from the stage's argv: train.yaml's default experiment first
        cfg = make_cfg(overrides, tmp_path, preset="quickstart")
        validate(cfg)
        assert cfg.hydra.runtime.choices.experiment in ("none", "two_stage_sup"), stage.row
        row = study.rows[stage.row]
        if "reward=unsup" in row.train:
            assert cfg.reward.mode == "unsup"
    GlobalHydra.instance().clear()


def test_drift_table_means_of_first_and_last_batches():
    from grace_lightning.study.report import drift_table

    steps = [{"step": i, "entropy": 3.0 - 0.1 * i, "collapse/distinct_2": 0.9} for i in range(20)]
    steps[19]["collapse/distinct_2"] = float("nan")  # a non-finite value is left out
    records = [
        {"label": "collapsing", "metrics": steps},
        {"label": "untrained", "metrics": []},
    ]
    table = drift_table(records, window=4).splitlines()
    assert table[0] == "| Row | entropy | distinct-2 |"
    # first 4 steps: 3.0, 2.9, 2.8, 2.7 -> 2.85; last 4: 1.4, 1.3, 1.2, 1.1 -> 1.25
    assert table[2] == "| collapsing | 2.85 -> 1.25 | 0.90 -> 0.90 |"
    assert len(table) == 3  # a row with no metrics has no line
    assert drift_table([{"label": "x", "metrics": []}]) == ""


def test_term_norm_table_shows_how_hard_each_loss_term_pushed():
    from grace_lightning.study.report import term_norm_table

    logged = [{"step": i, "grad_norm/pg": 1.0 + i, "grad_norm/joint": 4.0} for i in range(3)]
    later = [{"step": 3, "loss": 0.5}]  # steps after the logged ones carry neither key
    records = [
        {"label": "GRACE + joint", "metrics": logged + later},
        {
            "label": "joint only",
            "metrics": [{"step": 0, "grad_norm/pg": 0.0, "grad_norm/joint": 2.0}],
        },
        {"label": "InfoNCE", "metrics": [{"step": 0, "loss": 1.0}]},
    ]
    table = term_norm_table(records).splitlines()
    assert table[0] == "| Row | steps | grad_norm/pg | grad_norm/joint | pg / joint |"
    assert table[2] == "| GRACE + joint | 3 | 2 | 4 | 0.5 |"  # pg: mean of 1, 2, 3
    assert table[3] == "| joint only | 1 | 0 | 2 | 0 |"
    assert len(table) == 4  # a row that logged neither has no line
    assert term_norm_table([{"label": "x", "metrics": []}]) == ""


# ---------------------------------------------------------------------------- study v3
def v3_cfg(tmp_path: Path, *overrides: str):
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="study_v3",
            overrides=[
                f"out_dir={tmp_path / 'study'}",
                f"report_dir={tmp_path / 'report'}",
                *overrides,
            ],
        )
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.log_dir = str(tmp_path)
        cfg.record_dir = str(tmp_path / "records")  # never the repo's results/
    return cfg


def test_v3_every_stage_composes_and_validates(tmp_path):
    """Every train.py / eval stage of study_v3 is a valid config, per seed: the seed, the budget-
    sized contrastive schedule, the sweep's dev data, pg_weight=0 arms, the continued InfoNCE
    starting from the same seed's InfoNCE export, echo arms evaluating the same seed's model."""
    from hydra.core.global_hydra import GlobalHydra

    from grace_lightning.config import validate
    from grace_lightning.study.v3 import arm_of

    from .test_train import make_cfg

    study = v3_cfg(tmp_path)
    out = tmp_path / "study"
    stages = plan(study)
    trains = [s for s in stages if s.kind == "train"]
    evals = [s for s in stages if s.kind == "eval"]
    assert len(trains) == 11 + 10 * 3  # 11 sweep runs, 10 trained arms x 3 seeds
    assert len(evals) == 2 + 12 * 3  # Base, w/ reasoning once; 12 evaluated arms x 3 seeds
    assert not [s for s in stages if s.kind == "general"]  # the proxy is left out (v3)
    # seed-major: sweeps, untrained rows, then every stage of seed 0 before any of seed 1, ...
    seeds = [arm_of(s.row)[1] for s in stages if not s.row.startswith("sweeps/")]
    seeds = [x for x in seeds if x is not None]
    assert seeds == sorted(seeds) and set(seeds) == {0, 1, 2}
    names = [s.row for s in stages]
    assert (
        names.index("infonce/seed0")
        < names.index("infonce_more/seed0")
        < names.index("two_stage/seed0")
        < names.index("simcse/seed0")
        < names.index("infonce/seed1")
    )
    for stage in trains:
        overrides = [
            o.replace("<chosen-by-sweep-infonce>", "5e-05").replace(
                "<chosen-by-sweep-simcse>", "3e-05"
            )
            for o in stage.argv[2:]
            if not o.startswith("hydra.run.dir=")
        ]
        cfg = make_cfg(overrides, tmp_path, preset="quickstart")
        validate(cfg)
        arm, seed = arm_of(stage.row)
        if stage.row.startswith("sweeps/"):
            assert [t.name for t in cfg.callbacks.dev_eval.tasks] == ["stsb_train", "sick_train"]
            assert cfg.seed == 0 and cfg.trainer.max_steps == -1 and cfg.trainer.max_epochs == -1
            continue
        assert cfg.seed == seed, stage.row
        row = study.rows[arm]
        if row.group == "contrastive":
            # no step/epoch cap: the 5-minute budget ends the run and its lr decay
            assert cfg.trainer.max_steps == -1 and cfg.trainer.max_epochs == -1, stage.row
            assert cfg.trainer.max_time == "00:00:05:00"
            assert cfg.data.prompts_per_step == 32 and cfg.data.max_examples is None
        else:
            assert cfg.trainer.max_steps == 400  # a cap; the 5 minutes bind
            assert cfg.algo.log_term_grad_norms_steps == 8
        assert cfg.algo.pg_weight == (0.0 if "pg_weight=0" in " ".join(row.train) else 1.0)
        if row.get("init_from"):
            export = out / row.init_from / f"seed{seed}" / "train" / "export"
            assert cfg.init_from == str(export) and cfg.backbone.pretrained == str(export)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for stage in evals:
            overrides = [o for o in stage.argv[3:] if not o.startswith("hydra.run.dir=")]
            cfg = compose(config_name="eval", overrides=overrides)
            arm, seed = arm_of(stage.row)
            assert cfg.mode == study.rows[arm].eval.mode
            src = study.rows[arm].get("eval_of")
            if src:  # echo of the same seed's model
                assert cfg.model == str(out / src / f"seed{seed}" / "train")
    GlobalHydra.instance().clear()


def test_v3_dry_run_prints_arms_seeds_budget_and_estimate(tmp_path, capsys):
    import re

    run_study(v3_cfg(tmp_path, "dry_run=true"))
    text = capsys.readouterr().out
    assert "Seeds: [0, 1, 2]" in text
    study = v3_cfg(tmp_path)
    for arm, row in study.rows.items():
        seeded = row.get("train") is not None or row.get("eval_of") is not None
        assert re.search(rf"^{arm}\s+{'0,1,2' if seeded else '-'}\s", text, re.M), arm
    assert "sweep infonce: lr in [2e-05, 5e-05, 0.0001, 0.0003, 0.001]" in text
    m = re.search(
        r"Estimated total: (\d+) min = ([\d.]+) h \(training (\d+), evaluation (\d+), "
        r"stage start-up (\d+)\)",
        text,
    )
    total, hours, parts = int(m.group(1)), float(m.group(2)), [int(x) for x in m.groups()[2:]]
    assert abs(total - sum(parts)) <= 2 and hours == round(total / 60, 1)
    assert parts[0] == 41 * 5  # 30 arm trainings + 11 sweep runs, 5 min each
    assert 8.0 <= hours <= 12.0, hours  # the per-stage minutes measured in v3: ~10 h on 2 cores
    assert "optim.lr=<chosen-by-sweep-infonce>" in text  # decided after the sweep runs
    assert not (tmp_path / "study").exists()  # a dry run writes nothing


def _fake_sweep_run(train_dir: Path, dev: list[float]) -> None:
    (train_dir / "csv" / "version_0").mkdir(parents=True)
    lines = ["step,val/dev_avg"] + [f"{i},{v}" for i, v in enumerate(dev)]
    (train_dir / "csv" / "version_0" / "metrics.csv").write_text("\n".join(lines) + "\n")
    (train_dir / "DONE.json").write_text("{}")


def test_v3_sweep_picks_the_lr_with_the_best_last_dev_score(tmp_path):
    from grace_lightning.study.stages import train_argv
    from grace_lightning.study.v3 import chosen_lr

    cfg = v3_cfg(tmp_path, "sweeps.infonce.lrs=[2e-5,5e-5,1e-4]")
    out = tmp_path / "study" / "sweeps" / "infonce"
    _fake_sweep_run(out / "lr2e-05" / "train", [40.0, 70.0, 50.0])  # best mid-run, not at the end
    _fake_sweep_run(out / "lr5e-05" / "train", [40.0, 55.0])
    assert chosen_lr(cfg, "infonce") is None  # one run unfinished: no choice yet
    _fake_sweep_run(out / "lr0.0001" / "train", [40.0, 52.0])
    assert chosen_lr(cfg, "infonce", write=True) == 5e-05
    chosen = json.loads((out / "chosen.json").read_text())
    assert chosen["chosen_lr"] == 5e-05 and chosen["scores"]["2e-05"] == 50.0
    rows = selected_rows(cfg)
    argv = train_argv(cfg, rows["infonce/seed1"], tmp_path / "x")
    assert "optim.lr=5e-05" in argv and "seed=1" in argv
    assert argv.index("optim.lr=5e-05") < argv.index("method=infonce")  # row keys come after


def test_v3_seed_tables_pair_by_seed_and_state_the_claims():
    from omegaconf import OmegaConf

    from grace_lightning.study.v3 import seed_tables

    tasks = ["T1", "T2"]

    def rec(name, s1, s2):
        run = {"tasks": [{"task": "T1", "score": s1}, {"task": "T2", "score": s2}]}
        return {"name": name, "label": name.split("/")[0], "run": run, "examples": {}}

    # A beats B by 2, 3, 4 points on seeds 0-2 (paired); C vs B: +1, -1, 0
    records = [
        rec("a/seed0", 52, 52), rec("a/seed1", 60, 60), rec("a/seed2", 54, 54),
        rec("b/seed0", 50, 50), rec("b/seed1", 57, 57), rec("b/seed2", 50, 50),
        rec("c/seed0", 51, 51), rec("c/seed1", 56, 56), rec("c/seed2", 50, 50),
    ]  # fmt: skip
    cfg = OmegaConf.create(
        {
            "seeds": [0, 1, 2],
            "primary": {"name": "P", "tasks": tasks},
            "bootstrap": {"n": 50},
            "claims": [{"name": "a>b", "a": "a", "b": "b"}, {"name": "c>b", "a": "c", "b": "b"}],
        }
    )
    md, summary = seed_tables(cfg, records)
    ab, cb = summary["claims"]
    assert ab["diffs"] == [2.0, 3.0, 4.0]
    half = 4.303 * 1.0 / np.sqrt(3)  # t(0.975, 2) x sd / sqrt(n)
    assert ab["ci"] == pytest.approx((3 - half, 3 + half), abs=1e-3)
    assert ab["verdict"] == "supported"
    assert cb["diffs"] == [1.0, -1.0, 0.0] and cb["verdict"].startswith("not supported")
    # unpaired, the seeds' spread (50-57) would swamp a 3-point difference: pairing is the point
    assert summary["arms"]["a"]["ci"][0] < summary["arms"]["b"]["ci"][1]
    assert "| a>b (a vs b) | +3.00" in md and "supported" in md


def _study_processes(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            pids.append(int(proc.name))
    return pids


def test_tiny_v3_study_two_arms_two_seeds_killed_and_resumed(tmp_path):
    """study_v3 reduced to InfoNCE + its echo x 2 seeds on the tiny model (with a 1-lr sweep):
    the study process is SIGKILLed after its first stages; its running stage dies with it
    (no orphan); the rerun redoes no finished stage, finishes, and reports the seed-paired
    claim; a third run does nothing."""
    import signal
    import subprocess
    import sys
    import time

    overrides = [
        "base_model=tiny",
        "only=[infonce_echo]",
        "seeds=[0,1]",
        "sweeps.infonce.lrs=[0.001]",
        "max_new_tokens=4",
        "primary.tasks=[LocalSTS12,LocalSTS13]",
        "claims=[{name:echo_vs_infonce,a:infonce_echo,b:infonce}]",
        "bootstrap.n=50",
        f"record_dir={tmp_path / 'records'}",
        "train_extra=['trainer.max_steps=2','data.max_examples=16','data.prompts_per_step=4',"
        "'callbacks.dev_eval.max_samples=4','callbacks.model_checkpoint.every_n_rollout_batches=1']",
        "eval_extra=['tasks=[LocalSTS12,LocalSTS13]','eval.max_samples=8','precision=fp32']",
    ]
    out = tmp_path / "study"
    cli = [
        sys.executable,
        str(ROOT / "study.py"),
        "--config-name",
        "study_v3",
        f"out_dir={out}",
        f"report_dir={tmp_path / 'report'}",
        *overrides,
    ]
    study = subprocess.Popen(cli, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "sweeps" / "infonce" / "lr0.001" / "train" / "DONE.json"
    nxt = out / "infonce" / "seed0" / "train" / "stage.log"
    deadline = time.time() + 400
    while not (first.is_file() and nxt.is_file()) and time.time() < deadline:
        assert study.poll() is None, "the study ended before it was stopped"
        time.sleep(0.2)
    assert first.is_file() and nxt.is_file()
    study.send_signal(signal.SIGKILL)  # no handler runs: only PR_SET_PDEATHSIG stops the stage
    study.wait(timeout=30)
    for _ in range(150):
        if not _study_processes(str(out / "infonce")):
            break
        time.sleep(0.2)
    assert not _study_processes(str(out / "infonce")), "a stage outlived the killed study"
    assert not (out / "infonce" / "seed0" / "train" / "DONE.json").exists()

    cfg = v3_cfg(tmp_path, *overrides)
    run_study(cfg)
    attempts = lambda stage: len((out / stage / "attempts.jsonl").read_text().splitlines())  # noqa: E731
    assert attempts("sweeps/infonce/lr0.001/train") == 1  # finished before the kill: kept
    for s in (0, 1):
        for stage in (
            f"infonce/seed{s}/train",
            f"infonce/seed{s}/eval",
            f"infonce_echo/seed{s}/eval",
        ):
            assert (out / stage / "DONE.json").is_file(), stage
        resolved = (out / f"infonce/seed{s}/train/.hydra/config.yaml").read_text()
        assert f"seed: {s}\n" in resolved and "lr: 0.001" in resolved  # the sweep's choice
        echo = json.loads((out / f"infonce_echo/seed{s}/eval/scores.json").read_text())
        assert echo["mode"] == "echo" and echo["model"] == str(out / f"infonce/seed{s}/train")
    summary = json.loads((tmp_path / "report" / "seeds.json").read_text())
    (claim,) = summary["claims"]

    def primary(stage):
        tasks = json.loads((out / stage / "eval" / "scores.json").read_text())["tasks"]
        return np.mean([t["score"] for t in tasks if t["task"] in ("LocalSTS12", "LocalSTS13")])

    want = [primary(f"infonce_echo/seed{s}") - primary(f"infonce/seed{s}") for s in (0, 1)]
    np.testing.assert_allclose(claim["diffs"], want, atol=1e-9)
    half = 12.706 * np.std(want, ddof=1) / np.sqrt(2)
    np.testing.assert_allclose(claim["ci"], [np.mean(want) - half, np.mean(want) + half], atol=1e-6)
    report = (tmp_path / "report" / "study.md").read_text()
    assert "**Claims**" in report and "echo_vs_infonce" in report and "s1:" in report

    def all_attempts():
        return sum(len(p.read_text().splitlines()) for p in out.rglob("attempts.jsonl"))

    before = all_attempts()
    run_study(cfg)
    assert all_attempts() == before  # nothing redone

    # A fresh clone / machine: out_dir is gone, the records (tracked in git) are there. Every
    # finished stage is restored from them and nothing runs again; the CPU is on record.
    records = tmp_path / "records"
    assert not list(records.rglob("*.safetensors")) and not list(records.rglob("*.ckpt"))
    assert json.loads((records / "infonce/seed0/train/DONE.json").read_text())["cpu"]
    shutil.rmtree(out)
    run_study(cfg)
    assert all_attempts() == before
    assert json.loads((tmp_path / "report" / "seeds.json").read_text())["claims"][0][
        "diffs"
    ] == pytest.approx(want)
    from grace_lightning.study.v3 import chosen_lr

    assert chosen_lr(cfg, "infonce") == 0.001  # the sweep's choice, from its records

    # ... but a stage that loads a model whose weights are gone (here: seed 1's echo evaluation,
    # unfinished on the new machine) makes its training and that training's lineage run again.
    shutil.rmtree(out)
    shutil.rmtree(records / "infonce_echo/seed1/eval")
    run_study(cfg)
    assert attempts("infonce/seed1/train") == 1 and attempts("infonce/seed1/eval") == 1
    assert (out / "infonce/seed1/train/DONE.json").is_file() and has_weights(
        out / "infonce/seed1/train"
    )
    assert (out / "infonce_echo/seed1/eval/DONE.json").is_file()
    assert not has_weights(out / "infonce/seed0/train")  # seed 0's lineage is whole: not redone


def test_v3_a_changed_sweep_choice_redoes_the_lineage_trained_with_the_old_one(tmp_path):
    """The sweep's grid is extended and a new lr wins: the finished InfoNCE training of the old
    lr and every stage that loads it (its eval, the echo arm's eval) are moved aside and their
    records removed, so they run again; with the same choice nothing moves. A stage dir present
    without its DONE.json is not restored from the records (deleting DONE.json redoes it)."""
    cfg = v3_cfg(tmp_path, "only=[infonce_echo]", "seeds=[0]", "sweeps.infonce.lrs=[1e-4,1e-3]")
    out, rec = Path(cfg.out_dir), Path(cfg.record_dir)

    def finish(rel, lr=None, dev=None):
        for root in (out, rec):
            d = root / rel
            (d / ".hydra").mkdir(parents=True, exist_ok=True)
            (d / "DONE.json").write_text("{}")
            if lr is not None:
                (d / ".hydra" / "overrides.yaml").write_text(
                    # as a second stage records it: an interpolation that is not resolved
                    f"- method=infonce\n- backbone.pretrained=${{init_from}}\n- optim.lr={lr}\n"
                )
            if dev is not None:
                (d / "csv" / "version_0").mkdir(parents=True, exist_ok=True)
                (d / "csv" / "version_0" / "metrics.csv").write_text(f"step,val/dev_avg\n1,{dev}\n")

    finish("sweeps/infonce/lr0.0001/train", lr=0.0001, dev=60.0)
    finish("sweeps/infonce/lr0.001/train", lr=0.001, dev=50.0)
    finish("infonce/seed0/train", lr=0.0001)
    finish("infonce/seed0/eval")
    finish("infonce_echo/seed0/eval")
    rows = selected_rows(cfg)
    stages = plan(cfg, rows)
    (train,) = [s for s in stages if s.row == "infonce/seed0" and s.kind == "train"]
    assert not redo_changed_choice(cfg, train, stages, rows)  # 1e-4 still wins
    assert all(s.done for s in stages)

    # 1e-3 now wins (a rerun sweep run; here its score rewritten)
    (out / "sweeps/infonce/lr0.001/train/csv/version_0/metrics.csv").write_text(
        "step,val/dev_avg\n1,70.0\n"
    )
    assert redo_changed_choice(cfg, train, stages, rows)
    for rel in ("infonce/seed0/train", "infonce/seed0/eval", "infonce_echo/seed0/eval"):
        assert not (out / rel).exists() and not (rec / rel).exists(), rel
        assert list((out / rel).parent.glob((out / rel).name + ".superseded-*")), rel
    assert [s.row for s in stages if not s.done] == [
        "infonce/seed0",
        "infonce/seed0",
        "infonce_echo/seed0",
    ]
    assert any(a == "optim.lr=0.001" for a in train.rebuild())
    assert (rec / "sweeps/infonce/lr0.001/train/DONE.json").is_file()  # the sweep is kept

    # restore: a sweep stage whose dir is here without DONE.json stays unfinished
    (out / "sweeps/infonce/lr0.001/train/DONE.json").unlink()
    assert restore_records(cfg, stages) == 0
    shutil.rmtree(out / "sweeps")
    assert restore_records(cfg, stages) == 2


def test_a_stage_records_the_cpu_other_processes_used(tmp_path, monkeypatch):
    """DONE.json and attempts.jsonl carry others_cpu_share: the machine's busy CPU seconds
    (/proc/stat) minus the stage's own (its rusage), over wall x cores. Here a second process
    burns one core for the whole stage: on 2 cores that is ~50% of the machine."""
    import os
    import subprocess
    import sys

    from grace_lightning.study import stages as st

    assert st.others_cpu_share(100.0, 110.0, 4.0, 5.0) == round(6.0 / (5.0 * os.cpu_count()), 3)
    assert st.others_cpu_share(100.0, 103.0, 4.0, 5.0) == 0.0  # never negative
    assert st.others_cpu_share(None, 103.0, 4.0, 5.0) is None  # no /proc
    assert st.busy_cpu_seconds() > 0

    stage = st.Stage("row", "eval", tmp_path / "row" / "eval")
    stage.argv = [sys.executable, "-c", "import time; time.sleep(3)"]
    burn = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        st.run_subprocess(stage)
    finally:
        burn.kill()
    done = json.loads(stage.done_file.read_text())
    attempt = json.loads((stage.dir / "attempts.jsonl").read_text().splitlines()[-1])
    assert done["others_cpu_share"] == attempt["others_cpu_share"]
    # the burner alone is 1 / cores of the machine; whatever else runs here adds to it
    assert done["others_cpu_share"] >= 0.8 / os.cpu_count()


def test_a_record_keeps_its_line_endings_and_is_not_rewritten_when_unchanged(tmp_path):
    import os

    from grace_lightning.study.stages import ROOT_MARK, _copy

    out, rec = tmp_path / "metrics.csv", tmp_path / "rec.csv"
    out.write_bytes(b"step,model\r\n1,/repo/outputs/x\r\n")  # Lightning's CSV: CRLF
    _copy(out, rec, "/repo", ROOT_MARK)
    assert rec.read_bytes() == b"step,model\r\n1,<repo>/outputs/x\r\n"
    os.utime(rec, (1, 1))
    _copy(out, rec, "/repo", ROOT_MARK)  # record -> restore -> record: the same text
    assert rec.stat().st_mtime == 1
    back = tmp_path / "restored.csv"
    _copy(rec, back, ROOT_MARK, "/repo")
    assert back.read_bytes() == out.read_bytes()
