"""The algorithm extended from a module outside the package (issue 20, docs/extending.md).

``tests/user_ext/my_ext.py`` is a researcher's own module, put on ``sys.path`` here as
``PYTHONPATH=tests/user_ext`` would: its advantage estimator and its reward term train the tiny
model with one override each and no edit to ``grace_lightning``; a ``_target_`` that does not
import stops the run at config time, before any model loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from grace_lightning.config import ConfigError, validate
from grace_lightning.rl import advantages as adv_fns
from grace_lightning.rl import rewards as reward_fns
from grace_lightning.rl.targets import (
    ADVANTAGE_INPUTS,
    TERM_INPUTS,
    resolve_advantage,
    resolve_terms,
    score_terms,
)
from grace_lightning.schema import RewardConfig
from grace_lightning.train import train

from .conftest import ROOT
from .test_train import TINY, make_cfg, metric_rows

USER_EXT = ROOT / "tests" / "user_ext"
RUN = [*TINY, "reward=sup", "callbacks=none", "trainer.max_steps=2"]


@pytest.fixture
def my_ext(monkeypatch):
    """``import my_ext`` from tests/user_ext (as PYTHONPATH=tests/user_ext), its call log empty."""
    monkeypatch.syspath_prepend(str(USER_EXT))
    import my_ext

    my_ext.CALLS.clear()
    return my_ext


def _table(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "rationales.jsonl").read_text().splitlines()]


def _groups(rows: list[dict], k: int) -> list[list[dict]]:
    """The table's rows, K consecutive rows per group (one prompt), in the order written."""
    assert len(rows) % k == 0
    return [rows[i : i + k] for i in range(0, len(rows), k)]


# ---------------------------------------------------------------------------- (a) estimator
def test_user_estimator_trains_with_one_override(my_ext, tmp_path):
    cfg = make_cfg([*RUN, "algo.advantage._target_=my_ext.flipped_grpo"], tmp_path)
    _, objects = train(cfg)
    model = objects["model"]
    assert model.estimator.target == "my_ext.flipped_grpo"
    k, b = cfg.rollout.num_generations, cfg.data.prompts_per_step
    calls = [c for c in my_ext.CALLS if c["fn"] == "flipped_grpo"]
    rows = _table(tmp_path)
    assert len(calls) == len({r["step"] for r in rows}) >= 1  # once per rollout batch
    for c in calls:  # (B, K) fp32 rewards; the other inputs by **kwargs
        assert c["shape"] == (b, k) and c["dtype"] == torch.float32
        assert c["inputs"] == ["baseline", "step", "token_counts"]
    # the advantages the update trained on (the rationale table logs them) are the estimator's:
    # minus the reward's distance to its group mean
    for group in _groups(rows, k):
        mean = sum(r["reward"] for r in group) / k
        for r in group:
            assert r["advantage"] == pytest.approx(-(r["reward"] - mean), abs=1e-5)
        assert any(abs(r["advantage"]) > 1e-6 for r in group)  # a signal, not all zeros
    # the same key takes a dotted string: algo.advantage=<module>.<function>
    assert resolve_advantage("my_ext.flipped_grpo").target == "my_ext.flipped_grpo"


def test_user_estimator_declares_the_greedy_baseline_it_needs(my_ext):
    """needs_greedy_baseline in the config (or @estimator on the function) asks for the greedy
    rollout; an estimator that needs ``baseline`` without declaring it is refused."""

    node = {"_target_": "grace_lightning.rl.advantages.remax_advantages"}
    assert resolve_advantage(node).needs_greedy_baseline  # declared by the function
    assert not resolve_advantage({"_target_": "my_ext.flipped_grpo"}).needs_greedy_baseline
    declared = resolve_advantage({"_target_": "my_ext.flipped_grpo", "needs_greedy_baseline": True})
    assert declared.needs_greedy_baseline and "baseline" in declared.inputs


def test_estimator_output_is_checked_for_shape_and_finiteness():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    est = resolve_advantage("grpo")
    good = est(rewards, token_counts=None, baseline=None, scale="none", step=0)
    torch.testing.assert_close(good, adv_fns.group_advantages(rewards))
    wrong = est.__class__(**{**est.__dict__, "fn": lambda r, **_: r.mean(1)})
    with pytest.raises(ValueError, match=r"algo.advantage .*shape \(2,\); expected \(B, K\)"):
        wrong(rewards)
    nan = est.__class__(**{**est.__dict__, "fn": lambda r, **_: r * float("nan")})
    with pytest.raises(ValueError, match="non-finite advantage"):
        nan(rewards)
    masked = rewards.clone()
    masked[0, 0] = float("nan")  # reward.truncation=mask: the built-ins give it advantage 0
    assert torch.isfinite(est(masked, scale="none")).all()


# ---------------------------------------------------------------------------- (b) reward term
def test_user_reward_term_adds_to_the_total_with_its_weight(my_ext, tmp_path):
    base_dir, ext_dir = tmp_path / "base", tmp_path / "ext"
    train(make_cfg(RUN, base_dir))
    term = "+reward.terms.length={_target_:my_ext.length_reward,weight:0.1}"  # ONE override
    cfg = make_cfg([*RUN, term], ext_dir)
    _, objects = train(cfg)
    assert [t.name for t in objects["model"].reward_terms] == [
        "pos",
        "neg",
        "consistency",
        "hard",
        "length",
    ]
    calls = [c for c in my_ext.CALLS if c["fn"] == "length_reward"]
    k, b, tau = cfg.rollout.num_generations, cfg.data.prompts_per_step, cfg.reward.tau
    assert calls and all(c["shape"] == (b, k) and c["dtype"] == torch.float32 for c in calls)

    # per rollout (the rationale table): the term is the length / max_new_tokens, and the
    # reward is the paper's terms plus 0.1 x the term, all over tau
    for r in _table(ext_dir):
        assert r["rewards/length"] == pytest.approx(r["length"] / cfg.rollout.max_new_tokens)
        paper = r["rewards/pos"] + r["rewards/neg"]
        paper += 0.2 * r["rewards/consistency"] + 0.2 * r["rewards/hard"]
        expected = (paper + 0.1 * r["rewards/length"]) / tau
        assert r["reward"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    # the logged metrics: rewards/length/{mean,std,group_std} (TRL's names), and on the first
    # rollout batch (same weights, same seeds: the same rollouts) the total moved by exactly
    # 0.1 x rewards/length/mean / tau against the run without the term
    base, ext = (next(r for r in metric_rows(d) if r.get("reward")) for d in (base_dir, ext_dir))
    for stat in ("mean", "std", "group_std"):
        assert ext[f"rewards/length/{stat}"] != "", stat
    assert "rewards/length/mean" not in base
    assert float(ext["rewards/pos/mean"]) == float(base["rewards/pos/mean"])
    shift = 0.1 * float(ext["rewards/length/mean"]) / tau
    assert shift > 0
    assert float(ext["reward"]) == pytest.approx(float(base["reward"]) + shift, rel=1e-5)
    assert float(ext["rewards/total/mean"]) == pytest.approx(float(ext["reward"]), rel=1e-6)


def test_a_term_can_be_turned_off_or_reweighted(tmp_path):
    cfg = make_cfg(["reward.terms.hard=null", "reward.terms.pos.weight=2"], tmp_path)
    validate(cfg)
    terms = resolve_terms(cfg.reward)
    assert [(t.name, t.weight) for t in terms] == [("pos", 2.0), ("neg", 1.0), ("consistency", 0.2)]
    # the lambdas stay the knobs of the paper's weights (sweeps, Optuna)
    cfg = make_cfg(["reward=unsup", "reward.lambda_hard=0.75"], tmp_path)
    assert [t.weight for t in resolve_terms(cfg.reward)] == [1.0, 0.2, 0.75]


# ---------------------------------------------------------------------------- (c) config time
@pytest.mark.parametrize(
    "override, key",
    [
        ("algo.advantage._target_=my_ext.no_such_function", "algo.advantage._target_"),
        ("algo.advantage._target_=no_such_module.fn", "algo.advantage._target_"),
        ("+reward.terms.x={_target_:no_such_module.fn,weight:1}", "reward.terms.x._target_"),
    ],
)
def test_a_bad_target_stops_the_run_before_any_model_loads(
    my_ext, override, key, tmp_path, monkeypatch
):
    from grace_lightning import module as module_mod

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(module_mod, "load_backbone", no_model)
    cfg = make_cfg([*RUN, override], tmp_path)
    with pytest.raises(ConfigError) as err:
        train(cfg)
    message = str(err.value)
    assert message.startswith(f"{key}=") and "cannot import it" in message
    assert "PYTHONPATH" in message and "docs/extending.md" in message


@pytest.mark.parametrize(
    "override, message",
    [
        ("algo.advantage=foo", "algo.advantage='foo': no built-in estimator has that name"),
        ("+algo.advantage.eps=0.1", None),  # group_advantages takes eps: fine
        ("+algo.advantage.alpha=1", "algo.advantage.alpha: grace_lightning.rl.advantages."),
        ("+reward.terms.x={_target_:my_ext.length_reward,weight:abc}", "reward.terms.x.weight"),
        ("+reward.terms.x={_target_:my_ext.length_reward,power:2}", "reward.terms.x.power: my_ext"),
        ("+reward.terms.total={_target_:my_ext.length_reward}", "reward.terms.total: the name"),
        ("+reward.terms.x={_target_:my_ext.flipped_grpo}", "my_ext.flipped_grpo needs 'rewards'"),
        ("reward.objective=contrastive", "reward.objective='contrastive'"),
        ("rollout.num_generations=1", "needs K >= 2"),
        ("algo.advantage=rloo", None),  # the short names still work
        ("algo.advantage=my_ext.flipped_grpo", None),
    ],
)
def test_extension_config_errors_name_the_key(my_ext, override, message, tmp_path):
    cfg = make_cfg(["data.prompts_per_step=4", "algo.prompts_per_minibatch=2", override], tmp_path)
    if message is None:
        validate(cfg)
        return
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value)


# ---------------------------------------------------------------------------- the built-ins
@pytest.mark.parametrize("mode", ["sup", "unsup"])
def test_yaml_terms_are_the_papers_and_score_as_the_reward_functions(mode, tmp_path):
    """conf/reward/<mode>.yaml registers the paper's terms (= rewards.paper_terms, what a config
    without ``terms`` gets), and scoring them gives supervised_/unsupervised_rewards bit for bit."""
    cfg = make_cfg([f"reward={mode}"], tmp_path)
    reward = OmegaConf.to_container(cfg.reward, resolve=True)
    assert reward["terms"] == reward_fns.paper_terms(RewardConfig(mode=mode))
    no_terms = {k: v for k, v in reward.items() if k != "terms"}
    yaml_terms, code_terms = resolve_terms(reward), resolve_terms(no_terms)
    assert [(t.name, t.target, t.inputs) for t in yaml_terms] == [
        (t.name, t.target, t.inputs) for t in code_terms
    ]
    g = torch.Generator().manual_seed(0)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    inputs = {"rollouts": unit(4, 3, 8), "anchor": unit(4, 8), "negatives": unit(4, 2, 8)}
    inputs["tau"] = reward["tau"]
    ours = score_terms(yaml_terms, inputs, tau=reward["tau"])
    if mode == "sup":
        ref = reward_fns.supervised_rewards(
            inputs["anchor"], inputs["rollouts"], inputs["negatives"]
        )
    else:
        ref = reward_fns.unsupervised_rewards(inputs["anchor"], inputs["rollouts"])
    assert list(ours) == list(ref)
    for name in ref:
        assert torch.equal(ours[name], ref[name]), name
    if mode == "sup":  # reward.objective=infonce: the InfoNCE term, the total its log-probability
        infonce = resolve_terms({**reward, "objective": "infonce"})
        assert [t.name for t in infonce] == ["infonce"]
        got = score_terms(infonce, inputs, tau=reward["tau"])
        want = reward_fns.infonce_rewards(
            inputs["anchor"], inputs["rollouts"], inputs["negatives"], tau=reward["tau"]
        )
        assert torch.equal(got["infonce"], want["infonce"])
        torch.testing.assert_close(got["total"], want["total"], rtol=1e-6, atol=1e-6)


def test_every_algo_names_its_estimator_by_target(tmp_path):
    """conf/algo/*.yaml register the built-ins as _target_s; the short names map to the same."""
    for path in sorted((ROOT / "conf" / "algo").glob("*.yaml")):
        cfg = make_cfg([f"algo={path.stem}"], tmp_path)
        node = OmegaConf.to_container(cfg.algo.advantage)
        assert set(node) == {"_target_"}, path.name
        est = resolve_advantage(node)
        assert est.target.startswith("grace_lightning.rl.advantages."), path.name
        assert est.needs_greedy_baseline == (path.stem == "remax")
        assert est.min_generations == (1 if path.stem in ("reinforce_pp", "remax") else 2)
    for name, target in adv_fns.SHORT_NAMES.items():
        assert resolve_advantage(name).target == target


def test_extending_page_documents_every_input():
    page = (ROOT / "docs" / "extending.md").read_text()
    for name in [*ADVANTAGE_INPUTS, *TERM_INPUTS]:
        assert f"`{name}`" in page, name
    assert "tests/user_ext/my_ext.py" in page


def test_the_pages_test_template_runs(my_ext, tmp_path):
    """docs/extending.md's copy-paste test, run as it stands (relative imports as in tests/)."""
    page = (ROOT / "docs" / "extending.md").read_text()
    section = page.split("## A test for your extension", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {"__name__": "tests.extending_template", "__package__": "tests"}
    exec(compile(code, "docs/extending.md", "exec"), namespace)
    tests = sorted(n for n in namespace if n.startswith("test_"))
    assert tests == [
        "test_my_estimator_by_hand",
        "test_my_extensions_train",
        "test_my_term_by_hand",
    ]
    namespace["test_my_estimator_by_hand"]()
    namespace["test_my_term_by_hand"]()
    namespace["test_my_extensions_train"](tmp_path)


def test_sweep_report_reads_the_estimator_from_the_run_config(tmp_path):
    from grace_lightning.sweeps import report

    choices = {"algo": "rloo", "method": "grace"}
    user = report.describe(
        make_cfg(["algo=rloo", "algo.advantage._target_=my_ext.flipped_grpo"], tmp_path), choices
    )
    builtin = report.describe(make_cfg(["algo=rloo"], tmp_path), choices)
    assert user["advantage"] == "my_ext.flipped_grpo"
    assert builtin["advantage"] == "grace_lightning.rl.advantages.rloo_advantages"
    assert report.algorithm_label(user) == "rloo: my_ext.flipped_grpo"
    assert report.algorithm_label(builtin) == "rloo"
    assert report.advantage_target("remax") == "remax"  # a run from before _target_s
    rows = [
        {**builtin, "run": "a", "overrides": {}, "finished": True, "metrics": {"eval/avg": 50.0}},
        {**user, "run": "b", "overrides": {}, "finished": True, "metrics": {"eval/avg": 40.0}},
    ]
    assert report.plot_algorithms(rows, "eval/avg", tmp_path / "algorithms.png") is not None
    assert report.table(rows, "eval/avg")[0][:6] == [
        "run",
        "backbone",
        "method",
        "mode",
        "algo",
        "advantage",
    ]


def test_a_term_that_reads_the_texts_and_rationales(my_ext, tmp_path):
    """texts and completions reach a term (decoded only because it names them), aligned with the
    rollouts; under ReMax the greedy rollout is scored as member K+1 with its own rationale."""
    term = "+reward.terms.echo={_target_:my_ext.echo_penalty,weight:0.5}"
    cfg = make_cfg([*RUN, "algo=remax", term], tmp_path)
    _, objects = train(cfg)
    assert {"texts", "completions"} <= objects["model"].term_inputs
    k, b = cfg.rollout.num_generations, cfg.data.prompts_per_step
    shapes = [c["shape"] for c in my_ext.CALLS if c["fn"] == "echo_penalty"]
    assert shapes[:2] == [(b, k), (b, k + 1)]  # the K sampled; then with the greedy rollout
    first = next(c for c in my_ext.CALLS if c["fn"] == "echo_penalty")
    rows = _table(tmp_path)[: b * k]  # the first rollout batch, K rows per text
    for i, group in enumerate(_groups(rows, k)):  # the term saw each rollout's own text
        assert [r["text"] for r in group] == [first["texts"][i]] * k
        assert [r["rationale"] for r in group] == first["completions"][i]
        for r in group:  # and its value is what the table logs
            want = my_ext.echo_penalty([r["text"]], [[r["rationale"]]])[0, 0].item()
            assert r["rewards/echo"] == pytest.approx(want, abs=1e-6)
