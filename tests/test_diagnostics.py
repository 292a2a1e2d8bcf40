"""Collapse diagnostics (rl/diagnostics.py) on constructed batches."""

from __future__ import annotations

import math

import pytest
import torch

from grace_lightning.rl.diagnostics import (
    collapse_metrics,
    cross_group_cosine,
    cross_group_duplicate,
    distinct_n,
    within_group_cosine,
)


def test_distinct_n_by_hand():
    # bigrams: (1,2) (2,3) (3,1) | (1,2) (2,3) -> 3 unique of 5
    assert distinct_n([[1, 2, 3, 1], [1, 2, 3]], 2) == pytest.approx(3 / 5)
    # trigrams: (1,2,3) (2,3,1) | (1,2,3) -> 2 of 3
    assert distinct_n([[1, 2, 3, 1], [1, 2, 3]], 3) == pytest.approx(2 / 3)
    assert distinct_n([[1], []], 2) == 0.0  # no bigram at all
    with pytest.raises(ValueError):
        distinct_n([[1]], 0)


def test_identical_rationales_look_collapsed():
    same = [[5, 6, 7, 8, 9]] * 8  # 8 copies of one 4-bigram rationale
    varied = [list(range(10 * i, 10 * i + 5)) for i in range(8)]
    assert distinct_n(same, 2) == pytest.approx(4 / 32)  # 1 / number of rationales
    assert distinct_n(varied, 2) == 1.0
    assert cross_group_duplicate(same, 2) == 1.0
    assert cross_group_duplicate(varied, 2) == 0.0
    # duplicates within a group only are not cross-group duplicates
    assert cross_group_duplicate([[1], [1], [2], [2]], 2) == 0.0
    assert cross_group_duplicate([[1], [2], [2], [3]], 2) == pytest.approx(0.5)


def test_cross_group_cosine_by_hand():
    # group 0: e1, e1; group 1: e1, e2. cross pairs (ordered, both directions the same):
    # (e1,e1) x2 from g0 row pairs with g1's e1 -> cos 1, with g1's e2 -> cos 0: mean 1/2
    emb = torch.tensor([[[1.0, 0.0], [2.0, 0.0]], [[3.0, 0.0], [0.0, 1.0]]])
    assert cross_group_cosine(emb) == pytest.approx(0.5)
    # within: g0 (e1,e1) -> 1, g1 (e1,e2) -> 0: mean 1/2
    assert within_group_cosine(emb) == pytest.approx(0.5)


def test_cosines_agree_with_the_pairwise_definition():
    torch.manual_seed(0)
    B, K = 4, 3
    emb = torch.randn(B, K, 7)
    u = torch.nn.functional.normalize(emb, dim=-1).reshape(B * K, -1)
    sim = u @ u.T
    group = torch.arange(B).repeat_interleave(K)
    cross = group[:, None] != group[None]
    within = ~cross & ~torch.eye(B * K, dtype=torch.bool)
    assert cross_group_cosine(emb) == pytest.approx(float(sim[cross].mean()), abs=1e-6)
    assert within_group_cosine(emb) == pytest.approx(float(sim[within].mean()), abs=1e-6)


def test_collapsed_batch_metrics():
    B, K = 3, 2
    ids = torch.tensor([[4, 5, 6, 0]] * (B * K))
    mask = torch.tensor([[1, 1, 1, 0]] * (B * K))
    emb = torch.ones(B, K, 4)  # every embedding the same
    m = collapse_metrics(ids, mask, emb, K)
    assert m["collapse/cross_group_cosine"] == pytest.approx(1.0)
    assert m["collapse/within_group_cosine"] == pytest.approx(1.0)
    assert m["collapse/distinct_2"] == pytest.approx(2 / 12)
    assert m["collapse/distinct_3"] == pytest.approx(1 / 6)
    assert m["collapse/cross_group_duplicate"] == 1.0
    assert set(m) == {
        "collapse/distinct_2",
        "collapse/distinct_3",
        "collapse/cross_group_duplicate",
        "collapse/cross_group_cosine",
        "collapse/within_group_cosine",
    }


def test_degenerate_shapes_give_nan():
    assert math.isnan(cross_group_cosine(torch.randn(1, 4, 3)))
    assert math.isnan(within_group_cosine(torch.randn(3, 1, 3)))
