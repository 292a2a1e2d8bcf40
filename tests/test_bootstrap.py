"""Paired-bootstrap intervals (grace_lightning/eval/bootstrap.py) on synthetic data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import v_measure_score

from grace_lightning.eval import bootstrap as bs


def sts_run(gold: np.ndarray, noise: float, seed: int, name: str = "STS") -> dict:
    """A model whose cosines are gold + Gaussian noise of size ``noise``."""
    rng = np.random.default_rng(seed)
    cos = gold + noise * rng.standard_normal(gold.shape)
    ex = bs.TaskExamples(name, "STS", "spearman", cos, gold, key="k")
    return {"scores": {name: ex.score()}, "examples": {name: ex}}


def test_spearman_rows_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=(6, 40)).astype(float)  # many ties
    y = x + rng.standard_normal((6, 40))
    got = bs.spearman_rows(x, y)
    want = [spearmanr(a, b).statistic for a, b in zip(x, y)]
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert bs.spearman_rows(np.ones((1, 5)), np.arange(5.0)[None])[0] == 0.0  # constant row


def test_task_scores_on_the_full_sample_are_the_metrics():
    rng = np.random.default_rng(1)
    gold, cos = rng.random(50), rng.random(50)
    ex = bs.TaskExamples("t", "STS", "spearman", cos, gold)
    assert ex.score() == pytest.approx(100 * spearmanr(cos, gold).statistic, abs=1e-10)
    per = rng.random(30) * 100
    assert bs.TaskExamples("r", "Retr", "mean", per).score() == pytest.approx(per.mean())
    labels, clusters = rng.integers(0, 3, 40), rng.integers(0, 4, 40)
    ex = bs.TaskExamples("c", "Clust", "v_measure", labels, clusters)
    assert ex.score() == pytest.approx(100 * v_measure_score(labels, clusters))
    with pytest.raises(ValueError, match="kind"):
        bs.TaskExamples("x", "STS", "pearson", per)


def test_identical_models_give_a_zero_width_difference_at_zero():
    gold = np.random.default_rng(2).random(200)
    a = sts_run(gold, 0.3, seed=5)
    out = bs.bootstrap_runs({"a": a, "b": a}, references=["b"], n_boot=300, seed=0)
    d = out["a"]["diff"]["b"]
    assert d["delta"] == 0.0 and d["ci"] == (0.0, 0.0)
    lo, hi = out["a"]["avg_ci"]
    assert lo < out["a"]["avg"] < hi and hi - lo > 1.0  # a real interval around the Avg


def test_a_clearly_better_model_excludes_zero_and_pairing_narrows_the_difference():
    gold = np.random.default_rng(3).random(300)
    good, bad = sts_run(gold, 0.15, seed=6), sts_run(gold, 0.5, seed=7)
    out = bs.bootstrap_runs({"good": good, "bad": bad}, references=["bad"], n_boot=500, seed=0)
    d = out["good"]["diff"]["bad"]
    assert d["delta"] > 0 and d["ci"][0] > 0, d
    assert d["ci"][0] <= d["delta"] <= d["ci"][1]
    # nearly the same model: paired resampling cancels the shared noise, so the difference's
    # interval is much narrower than the Avg's own interval
    rng = np.random.default_rng(8)
    ex = good["examples"]["STS"]
    near = bs.TaskExamples("STS", "STS", "spearman", ex.a + 0.01 * rng.standard_normal(300), gold)
    twin = {"scores": {"STS": near.score()}, "examples": {"STS": near}}
    out = bs.bootstrap_runs({"good": good, "twin": twin}, references=["twin"], n_boot=500)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(out["good"]["diff"]["twin"]["ci"]) < 0.2 * width(out["good"]["avg_ci"])


def test_fixed_seed_reproduces_and_another_seed_differs():
    gold = np.random.default_rng(4).random(100)
    runs = {"a": sts_run(gold, 0.3, 1), "b": sts_run(gold, 0.4, 2)}
    one = bs.bootstrap_runs(runs, ["b"], n_boot=200, seed=0)
    assert one == bs.bootstrap_runs(runs, ["b"], n_boot=200, seed=0)
    assert one["a"]["avg_ci"] != bs.bootstrap_runs(runs, ["b"], n_boot=200, seed=1)["a"]["avg_ci"]


def test_mean_interval_covers_the_true_mean_about_95_percent_of_the_time():
    """Coverage sanity: 200 samples of n=80 from a known population; the 95% interval of the
    mean-kind score (retrieval / classification) covers the population mean in 88-99% of them."""
    rng = np.random.default_rng(9)
    true_mean, covered = 50.0, 0
    for trial in range(200):
        sample = rng.normal(true_mean, 20.0, size=80)
        ex = bs.TaskExamples("q", "Retr", "mean", sample)
        lo, hi = bs.bootstrap_runs(
            {"m": {"scores": {"q": ex.score()}, "examples": {"q": ex}}}, n_boot=400, seed=trial
        )["m"]["avg_ci"]
        covered += lo <= true_mean <= hi
    assert 0.88 <= covered / 200 <= 0.99, covered


def test_avg_interval_is_centred_on_the_reported_scores_and_fixed_tasks_add_no_width():
    gold = np.random.default_rng(10).random(100)
    run = sts_run(gold, 0.3, 3)
    ex = run["examples"]["STS"]
    # mteb reported 2 points more than the recomputation (e.g. clustering), plus a task without
    # per-example data: the Avg's interval moves with the reported score, the fixed task shifts it
    shifted = {"scores": {"STS": ex.score() + 2.0, "Other": 40.0}, "examples": {"STS": ex}}
    base = bs.bootstrap_runs({"m": run}, n_boot=300)["m"]["avg_ci"]
    got = bs.bootstrap_runs({"m": shifted}, n_boot=300)["m"]
    want = tuple((x + 2.0 + 40.0) / 2 for x in base)
    assert got["avg_ci"] == pytest.approx(want, abs=1e-9)
    assert got["tasks_with_ci"] == ["STS"]


def test_examples_on_different_data_are_not_paired():
    gold = np.random.default_rng(11).random(60)
    a, b = sts_run(gold, 0.2, 1), sts_run(gold, 0.2, 2)
    b["examples"]["STS"].key = "other data"
    d = bs.bootstrap_runs({"a": a, "b": b}, ["b"], n_boot=100)["a"]["diff"]["b"]
    assert d["unpaired"] == ["STS"] and d["ci"][0] == d["ci"][1] == pytest.approx(d["delta"])


def test_ndcg_at_10_per_query_hand_worked():
    # q1's relevant doc ranks first (nDCG 1); q2's relevant doc d3 ranks second: 1/log2(3)
    q = np.array([[1.0, 0.0], [0.0, 1.0]])
    d = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    qrels = {"q1": {"d1": 1}, "q2": {"d3": 1}}
    per = bs.ndcg_at_10_per_query(q, d, ["q1", "q2"], ["d1", "d2", "d3"], qrels)
    np.testing.assert_allclose(per, [100.0, 100 / math.log2(3)], atol=1e-9)


def test_examples_round_trip_through_json(tmp_path):
    ex = bs.TaskExamples("t", "STS", "spearman", [0.1, 0.5, 0.2], [1.0, 3.0, 2.0], 55.0, "k")
    bs.save_examples(tmp_path / "per_example.json", {"t": ex})
    back = bs.load_examples(tmp_path / "per_example.json")["t"]
    assert back.score() == ex.score() and back.reported == 55.0 and back.key == "k"
    assert bs.load_examples(tmp_path / "missing.json") == {}


def _noisy_clustering(seed: int = 0, n_per: int = 20, k: int = 6, noise: float = 0.3):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(k), n_per)
    assign = np.where(rng.random(labels.size) < noise, rng.integers(0, k, labels.size), labels)
    return bs.TaskExamples("C", "Clust", "v_measure", labels, assign)


def test_resampling_documents_inflates_v_measure():
    """Why clustering is held at its point: V-measure on document resamples (with replacement)
    sits above the full-sample V-measure (duplicates always share a cluster)."""
    ex = _noisy_clustering()
    reps = bs.task_replicates(ex, bs.resample_indices("C", ex.n, 300, 0))
    assert reps.mean() > ex.score() + 2.0, (ex.score(), reps.mean())


def test_clustering_is_reported_as_its_point_without_width():
    """Issue 19: a clustering task adds no width to the Avg interval and is not listed with an
    interval; a difference between two models' clusterings is their point difference.
    (On the old code the Avg interval was the biased resampling interval.)"""
    ex = _noisy_clustering()
    reported = ex.score()
    got = bs.bootstrap_runs({"m": {"scores": {"C": reported}, "examples": {"C": ex}}}, n_boot=200)[
        "m"
    ]
    assert got["avg_ci"] == pytest.approx((reported, reported), abs=1e-9)
    assert got["tasks_with_ci"] == []
    other = _noisy_clustering(seed=1)
    d = bs.bootstrap_runs(
        {
            "a": {"scores": {"C": reported}, "examples": {"C": ex}},
            "b": {"scores": {"C": other.score()}, "examples": {"C": other}},
        },
        ["b"],
        n_boot=200,
    )["a"]["diff"]["b"]
    assert d["ci"] == pytest.approx((d["delta"], d["delta"]), abs=1e-9)
