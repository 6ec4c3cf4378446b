"""Label-efficiency strategies (issue 18): balanced budgets, k-center greedy, cst+al+."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bmcell import selection


def test_k_center_greedy_picks_the_known_farthest_points():
    # A tight cluster at the origin and three far corners: after the first (row 0),
    # greedy takes the farthest corner, then the farthest from both, and so on.
    X = np.array([[0, 0], [0.1, 0], [0, 0.1], [10, 0], [0, 5], [-3, 0], [0.05, 0.05]], dtype=float)
    assert selection.k_center_greedy(X, 4).tolist() == [0, 3, 4, 5]
    # With labelled points at the corners, the first pick is the farthest from them:
    # (0.1, 0) is 3.1 from (-3, 0), every other cluster point is nearer to a corner.
    got = selection.k_center_greedy(X, 1, labelled=np.array([[10, 0], [0, 5], [-3, 0]]))
    assert got.tolist() == [1]
    assert selection.k_center_greedy(X, 0).size == 0
    assert sorted(selection.k_center_greedy(X, 99).tolist()) == list(range(7))


def test_balanced_budget_respects_shares_and_redistributes():
    cls = np.array([0] * 50 + [1] * 30 + [2] * 3)
    idx = np.arange(cls.size)
    pri = -idx.astype(float)  # lower row first
    got = selection.balanced_budget(idx, cls, 30, pri)
    counts = np.bincount(cls[got], minlength=3)
    # Class 2 has 3 candidates; its unused share goes to 0 and 1 equally.
    assert counts.tolist() == [14, 13, 3] and got.size == 30
    # Highest priority (lowest row here) first within each class.
    assert set(got[cls[got] == 0]) == set(range(14))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 5), min_size=0, max_size=80),
    st.integers(0, 100),
    st.floats(0.05, 1.0),
)
def test_balanced_budget_properties(classes, k, share):
    cls = np.asarray(classes, dtype=np.int64)
    idx = np.arange(cls.size, dtype=np.int64)
    got = selection.balanced_budget(idx, cls, k, np.zeros(cls.size))
    assert got.size == min(k, cls.size)
    assert np.all(np.diff(got) > 0)  # a set, ascending
    avail = np.bincount(cls, minlength=6)
    counts = np.bincount(cls[got], minlength=6)
    for a in range(6):
        for b in range(6):
            if counts[a] > counts[b] + 1:
                assert counts[b] == avail[b]  # only an exhausted class gets fewer
    cap = math.ceil(share * k)
    if np.minimum(avail, cap).sum() >= min(k, cls.size):
        assert counts.max(initial=0) <= cap


def _probs(n, c, seed):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, size=(n, c))
    z -= z.max(1, keepdims=True)
    P = np.exp(z)
    return (P / P.sum(1, keepdims=True)).astype(np.float32)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 300), st.integers(2, 17), st.integers(0, 10_000), st.integers(1, 50))
def test_efficiency_strategies_are_subsets_of_their_rules(n, c, seed, budget):
    P = _probs(n, c, seed)
    emb = np.random.default_rng(seed).normal(size=(n, 8))
    params = selection.SelectionParams()
    both = selection.select_cst_al(P, params.threshold, params.margin)
    for name in selection.EFFICIENCY_STRATEGIES:
        s = selection.select_efficient(name, P, params, embedding=emb, budget=budget)
        assert set(s.cst) <= set(both.cst) and set(s.al) <= set(both.al)
        assert not set(s.cst) & set(s.al)
        assert s.cst.size <= budget and s.al.size <= budget
        if name in ("al-diverse", "al-balanced"):
            assert s.al.size == min(budget, both.al.size)


def test_study_strategies_are_unchanged_and_diverse_needs_an_embedding():
    P = _probs(500, 17, 3)
    params = selection.SelectionParams()
    for name in ("cst", "al", "cst+al"):
        assert name not in selection.EFFICIENCY_STRATEGIES
    with pytest.raises(ValueError, match="embedding"):
        selection.select_efficient("al-diverse", P, params)
    with pytest.raises(ValueError, match="unknown"):
        selection.select_efficient("cst", P, params)
