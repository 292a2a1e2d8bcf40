"""W&B sweep files, their Hydra multirun equivalents, the Optuna config, the algo configs and the
sweep report.

Every grid point of every sweep composes exactly as ``wandb agent`` would launch it. A 2-point
multirun of a sweep file runs end to end on the tiny model, ending with an evaluation, and the
report tool builds its table and plot from the run dirs.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from grace_lightning import scale
from grace_lightning.config import validate
from grace_lightning.contrastive import check_args
from grace_lightning.presets import resolve_overrides, world_size
from grace_lightning.sweeps import report
from grace_lightning.sweeps.multirun import multirun_command
from grace_lightning.sweeps.spec import (
    agent_overrides,
    fixed_overrides,
    grid_points,
    load_sweep,
    merge_overrides,
    multirun_overrides,
)
from grace_lightning.train import train

from .conftest import ROOT
from .test_readme_commands import MARKDOWN, candidate_lines
from .test_train import CONF, TINY, make_cfg

SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
ALGOS = ["grpo", "dr_grpo", "dapo", "reinforce_pp", "remax", "rloo"]
# metrics a run logs without an evaluation (GraceModule / ContrastiveModule)
TRAINING_METRICS = {"reward", "loss", "train/acc"}


def test_the_four_sweeps_exist():
    names = {p.stem for p in SWEEPS}
    assert {
        "sup_vs_unsup",
        "lambda_grid",
        "algorithms",
        "baselines",
        "qwen3_fsdp",
        "pg_weight",
    } <= names


GPU_MEMORY = 79.6 * 2**30  # what an 80 GB H100 reports (torch.cuda total_memory)


def launched_config(sweep: dict, point: dict):
    """The config ``wandb agent`` gets for ``point``: its command line as train.py resolves it
    (``experiment=auto`` -> the preset, grace_lightning/presets.py), composed."""
    overrides = resolve_overrides(agent_overrides(sweep, point))
    return compose("train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_grid_point_composes_as_the_agent_launches_it(path):
    sweep = load_sweep(path)
    assert (ROOT / sweep["program"]).is_file()
    assert sweep["command"][:3] == ["${env}", "${interpreter}", "${program}"]
    assert sweep["metric"]["goal"] in ("maximize", "minimize")
    points = grid_points(sweep)
    expected = 1
    for spec in sweep["parameters"].values():
        expected *= len(spec["values"])
    assert len(points) == expected
    GlobalHydra.instance().clear()
    with initialize_config_dir(CONF, version_base="1.3"):
        for point in points:
            cfg = launched_config(sweep, point)
            validate(cfg)
            if cfg.model._target_.endswith("ContrastiveModule"):
                m = cfg.model
                check_args(m.objective, m.data_mode, m.tau, m.lr_schedule)
            choices = cfg.hydra.runtime.choices
            for key, value in point.items():  # the swept value took effect
                if key in choices:
                    assert choices[key] == value, (key, point)
                else:
                    assert OmegaConf.select(cfg, key) == value, (key, point)
            # the sweep's metric is what train.py returns, and something the run logs
            metric = sweep["metric"]["name"]
            assert cfg.optimized_metric == metric
            if metric.startswith("eval/"):
                assert cfg.get("eval") and cfg.callbacks.final_eval.suite is not None
            else:
                assert metric in TRAINING_METRICS
            assert "wandb" in cfg.logger and cfg.logger.wandb.offline is False
            assert cfg.logger.wandb.run_tags_from_config[0] == cfg.reward.mode  # W&B tags
            # the paper recipe on the GPUs the sweep names: fits by the memory model (startup's
            # check); more than one GPU only where the sweep's command names the trainer
            world = world_size(cfg)
            if world != 1:
                assert any(o.startswith("trainer=") for o in fixed_overrides(sweep)), point
            # (GRACE by its rollout batch, the contrastive baselines by their one-forward step)
            peak = scale.predict_config_peak(cfg, world)
            assert peak is not None and peak <= scale.usable_memory(GPU_MEMORY), (
                path.stem,
                point,
                peak / 2**30,
            )


def _readme_multiruns() -> list[list[str]]:
    """The distinct `python train.py -m ...` commands of the READMEs and the docs site (code
    blocks, tables and running text; overrides only, comments dropped)."""
    lines = []
    for page in MARKDOWN:
        for _, line in candidate_lines(page):
            line = line.strip()
            # cluster lines (hydra/launcher=...) are composed by tests/test_launchers.py
            if line.startswith("python train.py -m ") and "hydra/launcher=" not in line:
                overrides = line.split("#")[0].split()[3:]
                if overrides not in lines:  # the same command on several pages
                    lines.append(overrides)
    return lines


def _cover(overrides: list[str]) -> list[list[str]]:
    """Points of a multirun that use every value of every comma-separated override at least
    once (not every combination: the sweep-file test composes the full paper grids)."""
    choices = []
    for o in overrides:
        key, value = o.split("=", 1)
        values = value.split(",") if "," in value and "[" not in value else [value]
        choices.append([f"{key}={v}" for v in values])
    n = max(len(c) for c in choices)
    return [[c[i % len(c)] for c in choices] for i in range(n)]


def test_readme_multirun_commands_compose_at_every_point():
    """The paper-scale grids the docs show (evaluated on ``eval=fast``) are the sweep files'; every
    other multirun composes at every point as train.py runs it (``experiment=auto`` resolved):
    on the CPU for the embedded models, on the GPU for a paper backbone."""
    commands = _readme_multiruns()
    paper = [c for c in commands if "eval=fast" in c]
    sweeps = [multirun_command(p, [])[3:] for p in SWEEPS]
    assert sorted(paper) == sorted(sweeps), "sweeps/README.md: regenerate with --dry-run"
    others = [c for c in commands if c not in paper]
    assert len(others) >= 4
    GlobalHydra.instance().clear()
    with initialize_config_dir(CONF, version_base="1.3"):
        for overrides in others:
            for point in _cover(overrides):
                cfg = compose("train", overrides=resolve_overrides(point), return_hydra_config=True)
                validate(cfg)
                embedded = cfg.backbone.name in ("smollm2", "tiny")
                assert (cfg.trainer.accelerator == "cpu") == embedded, point
                if "optimized_metric=eval/avg" in point:
                    assert cfg.get("eval"), point  # eval/avg exists only with an eval suite


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_agent_overrides_match_wandbs_own_formatting(path):
    utils = pytest.importorskip("wandb.sdk.launch.sweeps.utils")
    sweep = load_sweep(path)
    for point in grid_points(sweep):
        args = {k: {"value": v} for k, v in point.items()}
        wandb_args = utils.create_sweep_command_args({"args": args})["args_no_hyphens"]
        fixed = [c for c in sweep["command"] if not c.startswith("${")]
        assert agent_overrides(sweep, point) == fixed + wandb_args


def test_sweep_grids_are_the_papers():
    """Together the sweep files run the paper's grids: every backbone x reward mode, every
    backbone x method (Qwen3-4B in its own FSDP x4 file), the λ grid and the RL algorithms."""
    grid = {p.stem: load_sweep(p)["parameters"] for p in SWEEPS}
    for key in ("reward.lambda_consistency", "reward.lambda_hard"):
        assert grid["lambda_grid"][key]["values"] == [0, 0.25, 0.5, 0.75, 1]
    assert grid["algorithms"]["algo"]["values"] == ALGOS
    runs = set()  # (backbone, experiment) of every GRACE / baseline run at paper scale
    GlobalHydra.instance().clear()
    with initialize_config_dir(CONF, version_base="1.3"):
        for name in ("sup_vs_unsup", "baselines", "qwen3_fsdp"):
            sweep = load_sweep(ROOT / "sweeps" / f"{name}.yaml")
            for point in grid_points(sweep):
                cfg = launched_config(sweep, point)
                runs.add((cfg.backbone.name, cfg.hydra.runtime.choices.experiment))
    experiments = ["paper_sup", "paper_unsup", "paper_infonce", "paper_simcse"]
    backbones = ["qwen", "llama", "qwen3b", "qwen3"]
    assert runs == {(b, e) for b in backbones for e in experiments}


def test_multirun_equivalent_of_a_sweep():
    sweep = load_sweep(ROOT / "sweeps" / "lambda_grid.yaml")
    args = multirun_overrides(sweep)
    assert "reward.lambda_consistency=0,0.25,0.5,0.75,1" in args
    assert "backbone=qwen" in args and not any(a.startswith("experiment=") for a in args)
    assert "experiment=paper_sup" in resolve_overrides(args)  # train.py's experiment=auto
    # extra overrides replace the sweep's, including the keys below a replaced group
    args = multirun_overrides(sweep, ["backbone=tiny", "logger=csv"])
    assert "backbone=qwen" not in args and "backbone=tiny" in args
    assert not any(a.startswith("logger.wandb") for a in args) and "logger=csv" in args
    cmd = multirun_command(ROOT / "sweeps" / "lambda_grid.yaml", [])
    assert cmd[1].endswith("train.py") and cmd[2] == "-m"
    assert "logger.wandb.offline=false" not in cmd  # offline unless --online
    assert merge_overrides(["a=1", "b.c=2"], ["b=x"]) == ["a=1", "b=x"]


def test_two_point_multirun_runs_end_to_end_and_reports(tmp_path):
    """sweeps/sup_vs_unsup.yaml on the tiny model: backbone=tiny leaves reward=sup,unsup."""
    sweep_dir = tmp_path / "multirun"
    overrides = [
        *TINY,
        "trainer=cpu",
        "logger=csv",
        "eval=local",  # replaces the sweep's eval=fast (Hub): local files only
        "eval.max_samples=16",
        "callbacks.final_eval.tasks=[LocalSTS12]",
        "callbacks.model_checkpoint.save_last=false",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    cmd = [
        sys.executable,
        "-m",
        "grace_lightning.sweeps.multirun",
        str(ROOT / "sweeps" / "sup_vs_unsup.yaml"),
        *overrides,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert runs == ["0", "1"]

    out = tmp_path / "report"
    assert report.main([str(sweep_dir), "--out", str(out)]) == 0
    rows = report.collect_offline(sweep_dir)
    assert [(r["backbone"], r["mode"], r["method"]) for r in rows] == [
        ("tiny", "sup", "grace"),
        ("tiny", "unsup", "grace"),
    ]
    for r in rows:  # training metrics and the final evaluation's score
        assert {"reward", "loss", "eval/avg", "eval/STS"} <= set(r["metrics"])
        assert r["finished"]
    header = (out / "runs.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["run", "backbone", "method", "mode"] and "eval/avg" in header
    assert "`eval/avg`" in (out / "runs.md").read_text()
    assert (out / "sup_vs_unsup.png").stat().st_size > 0


def _row(metric: float, **fields) -> dict:
    base = {"run": "r", "backbone": "qwen", "method": "grace", "mode": "sup", "algo": "grpo"}
    base.update(lambda_consistency=0.2, lambda_hard=0.2, lr=1e-6, experiment=None)
    base.update(fields)
    return {**base, "overrides": {}, "finished": True, "metrics": {"eval/avg": metric}}


def test_report_draws_the_heatmap_algorithms_and_baselines(tmp_path):
    lambdas = [0, 0.5, 1]
    rows = [
        _row(40 + a + 2 * b, lambda_consistency=a, lambda_hard=b) for a in lambdas for b in lambdas
    ]
    rows += [_row(50 + i, algo=a) for i, a in enumerate(ALGOS)]
    rows += [_row(45, method="infonce"), _row(41, method="simcse", mode="unsup")]
    rows += [_row(39, mode="unsup"), _row(44, backbone="llama", method="infonce")]
    result = report.build_report(rows, tmp_path)
    names = {p.name for p in result["plots"]}
    assert names == {"sup_vs_unsup.png", "lambda_heatmap.png", "algorithms.png", "baselines.png"}
    assert result["metric"] == "eval/avg" and result["runs"] == len(rows)
    assert report.choose_metric([_row(1.0)], "reward") == "reward"
    # a continuous search (Optuna) gets a scatter, not a mostly empty grid
    optuna = [
        _row(float(i), lambda_consistency=i / 10, lambda_hard=(i * 7 % 10) / 10) for i in range(10)
    ]
    assert report.plot_lambda_heatmap(optuna, "eval/avg", tmp_path / "scatter.png") is not None


def test_report_pairs_two_arms_by_seed(tmp_path):
    """sweeps/pg_weight.yaml's grid (algo.pg_weight=1,0 x seed=0,1,2): runs.md gets the per-seed
    differences A - B, their mean and the 95% t-interval, by hand: diffs -3, -2, -4 -> mean -3,
    sd 1, half-width 4.303 / sqrt(3) = 2.484 -> [-5.48, -0.52], the reverse holds."""
    scores = {("1", "0"): 50, ("1", "1"): 52, ("1", "2"): 51}
    scores |= {("0", "0"): 53, ("0", "1"): 54, ("0", "2"): 55}
    rows = []
    for (w, seed), v in scores.items():
        row = _row(float(v))
        row["overrides"] = {"backbone": "qwen", "algo.pg_weight": w, "seed": seed}
        rows.append(row)
    result = report.build_report(rows, tmp_path)
    p = result["paired"]
    assert (p["key"], p["a"], p["b"]) == ("algo.pg_weight", "1", "0")
    assert p["per_seed"] == {"0": (50, 53), "1": (52, 54), "2": (51, 55)}
    assert p["mean"] == pytest.approx(-3.0)
    assert p["ci"] == pytest.approx((-3 - 4.303 / 3**0.5, -3 + 4.303 / 3**0.5))
    assert p["verdict"].startswith("contradicted")
    text = (tmp_path / "runs.md").read_text()
    assert "## Seed-paired: `algo.pg_weight=1` - `algo.pg_weight=0`" in text
    assert "| 2 | 51.00 | 55.00 | -4.00 |" in text and "-3.00 [-5.48, -0.52]" in text
    # a seed that has one arm only is left out of the pairs
    del rows[-1]  # pg_weight=0, seed 2
    assert list(report.seed_paired(rows, "eval/avg")["per_seed"]) == ["0", "1"]
    # not a seed x two-arm grid: no comparison
    for row in rows:
        row["overrides"].pop("seed")
    assert report.seed_paired(rows, "eval/avg") is None


def test_report_reads_metrics_csv_versions_and_eval_scores(tmp_path):
    run = tmp_path / "run"
    (run / "csv" / "version_0").mkdir(parents=True)
    (run / "csv" / "version_1").mkdir(parents=True)
    (run / "csv" / "version_0" / "metrics.csv").write_text("epoch,reward,step\n0,1.0,0\n0,2.0,1\n")
    (run / "csv" / "version_1" / "metrics.csv").write_text("epoch,reward,loss,step\n0,3.0,,2\n")
    (run / "eval").mkdir()
    (run / "eval" / "scores.json").write_text('{"avg": 55.5, "categories": {"STS": 60.0}}')
    assert report.last_metrics(run) == {"reward": 3.0, "step": 2.0}
    assert report.eval_metrics(run) == {"eval/avg": 55.5, "eval/STS": 60.0}


def test_optuna_search_runs_two_trials_and_reports(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep_dir = tmp_path / "optuna"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "hparams_search=lambda_optuna",  # MULTIRUN by itself: no -m
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=1",
        f"hydra.sweep.dir={sweep_dir}",
        *[o for o in TINY if not o.startswith("optim.lr=")],  # lr is searched
        "trainer.max_steps=1",
        "callbacks=none",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert set(best.best_params) == {"reward.lambda_consistency", "reward.lambda_hard", "optim.lr"}
    rows = report.collect_offline(sweep_dir)
    assert len(rows) == 2 and all("reward" in r["metrics"] for r in rows)
    assert best.best_value == max(r["metrics"]["reward"] for r in rows)


def test_optuna_search_config_composes():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = make_cfg(["hparams_search=lambda_optuna"])
    validate(cfg)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert set(sweeper.params) == {"reward.lambda_consistency", "reward.lambda_hard", "optim.lr"}
    assert cfg.optimized_metric == "reward" and str(cfg.hydra.mode) == "RunMode.MULTIRUN"


@pytest.mark.parametrize("algo", ALGOS)
def test_each_algo_config_composes_and_validates(algo):
    cfg = make_cfg([f"algo={algo}"])
    validate(cfg)
    a = cfg.algo
    expected = {
        "grpo": ("grpo", "none", "dapo"),
        "dr_grpo": ("grpo", "none", "dr_grpo"),
        "dapo": ("grpo", "group", "dapo"),
        "reinforce_pp": ("reinforce_pp", "batch", "dapo"),
        "remax": ("remax", "none", "dapo"),
        "rloo": ("rloo", "none", "dapo"),
    }[algo]
    from grace_lightning.rl.advantages import SHORT_NAMES

    # the estimator is a _target_ (docs/extending.md); the expected short names are its spelling
    assert a.advantage._target_ == SHORT_NAMES[expected[0]]
    assert (a.scale_rewards, a.loss_type) == expected[1:]
    assert a.dynamic_sampling is (algo == "dapo")
    assert a.epsilon_high == (0.28 if algo == "dapo" else 0.2)
    assert a.prompts_per_minibatch == 2 and a.epsilon_low == 0.2  # the rest comes from grpo.yaml


@pytest.mark.parametrize("algo", [a for a in ALGOS if a != "grpo"])  # grpo: test_train.py
def test_each_algo_config_trains_two_steps(algo, tmp_path):
    cfg = make_cfg([*TINY, "reward=unsup", "callbacks=none", f"algo={algo}"], tmp_path)
    _, objects = train(cfg)
    from grace_lightning.models.backbone import BackboneConfig, load_backbone

    fresh, _ = load_backbone(BackboneConfig(**cfg.backbone))
    moved = [
        not torch.equal(p.detach().cpu(), q)
        for p, q in zip(objects["model"].policy.parameters(), fresh.parameters())
    ]
    assert all(moved), f"{algo}: {moved.count(False)} parameters did not move"
