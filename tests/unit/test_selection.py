"""The selection rules: CST inclusive, AL strict, CST+AL disjoint with AL precedence."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from bmcell.selection import (
    STRATEGIES,
    SelectionParams,
    cap_per_class,
    entropy,
    margin,
    sample_pool,
    select,
    select_al,
    select_cst,
    select_cst_al,
    select_entropy,
    select_least_confidence,
    select_random,
    select_st,
    top2,
)

# Dyadic values make p1, p1 - p2 and the row sums exact, so boundary rows really sit
# on the boundary.
DYADIC = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


@st.composite
def probability_matrices(draw) -> tuple[np.ndarray, float, float]:
    """Dirichlet rows plus rows exactly at the CST and AL boundaries."""
    n = draw(st.integers(0, 60))
    c = draw(st.integers(2, 17))
    alpha = draw(st.sampled_from([0.05, 0.3, 1.0, 5.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    t = draw(st.sampled_from(DYADIC[3:]))  # t >= 0.5 so a row [t, 1 - t, 0...] has p1 = t
    m = draw(st.sampled_from(DYADIC[:4]))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    rows = [np.random.default_rng(seed).dirichlet(np.full(c, alpha), size=n)]
    at_t = np.zeros(c)
    at_t[:2] = (t, 1 - t)
    at_m = np.zeros(c)
    at_m[:2] = ((1 + m) / 2, (1 - m) / 2)  # margin exactly m
    below_m = np.zeros(c)
    below_m[:2] = (0.5, 0.5)  # margin 0 < m
    rows.append(np.stack([at_t, at_m, below_m, np.roll(at_t, 1)]))
    P = np.concatenate(rows).astype(dtype)
    P = P[np.random.default_rng(seed).permutation(len(P))]
    return P, t, m


@settings(max_examples=150, deadline=None)
@given(probability_matrices())
def test_cst_picks_exactly_rows_at_or_above_threshold(case) -> None:
    P, t, _ = case
    expected = np.flatnonzero(P.max(axis=1) >= P.dtype.type(t))
    np.testing.assert_array_equal(select_cst(P, t), expected)
    np.testing.assert_array_equal(select_st(P, t), expected)


@settings(max_examples=150, deadline=None)
@given(probability_matrices())
def test_al_picks_exactly_rows_below_margin(case) -> None:
    P, _, m = case
    s = np.sort(P, axis=1)
    expected = np.flatnonzero(s[:, -1] - s[:, -2] < P.dtype.type(m))
    np.testing.assert_array_equal(select_al(P, m), expected)


@settings(max_examples=150, deadline=None)
@given(probability_matrices())
def test_cst_al_is_the_union_without_duplicates_and_al_wins(case) -> None:
    P, t, m = case
    both = select_cst_al(P, t, m)
    cst, al = select_cst(P, t), select_al(P, m)
    np.testing.assert_array_equal(both.al, al)
    np.testing.assert_array_equal(both.cst, np.setdiff1d(cst, al))
    assert np.intersect1d(both.cst, both.al).size == 0
    np.testing.assert_array_equal(both.rows, np.union1d(cst, al))
    if t >= 0.5 + m / 2:
        assert np.intersect1d(cst, al).size == 0  # the study's settings never overlap


def test_boundaries_as_documented() -> None:
    P = np.array([[0.9, 0.1, 0.0], [0.625, 0.375, 0.0], [0.6, 0.4, 0.0]])
    assert 0 in select_cst(P, 0.9)  # inclusive
    np.testing.assert_array_equal(select_al(P, 0.25), [2])  # margin exactly 0.25: strict
    # 0.6 - 0.4 rounds to 0.19999999999999996: the float difference decides.
    assert 2 in select_al(P, 0.2)
    P32 = P.astype(np.float32)
    assert 0 in select_cst(P32, 0.9)  # compared in P's dtype


def test_overlap_goes_to_al() -> None:
    P = np.array([[0.6, 0.4], [0.95, 0.05], [0.5, 0.5]])
    both = select_cst_al(P, threshold=0.55, margin=0.3)
    np.testing.assert_array_equal(both.cst, [1])
    np.testing.assert_array_equal(both.al, [0, 2])


def test_top2_and_margin() -> None:
    P = np.array([[0.1, 0.6, 0.3], [0.4, 0.2, 0.4]])
    i1, p1, i2, p2 = top2(P)
    np.testing.assert_array_equal(i1, [1, 0])
    np.testing.assert_array_equal(i2, [2, 2])  # tie goes to the lower class index
    np.testing.assert_allclose(p1, [0.6, 0.4])
    np.testing.assert_allclose(margin(P), [0.3, 0.0])


def test_bad_probabilities_are_rejected() -> None:
    with pytest.raises(ValueError, match="shape"):
        top2(np.ones((3,)))
    with pytest.raises(ValueError, match="sum to 1"):
        top2(np.array([[0.5, 0.6]]))


def test_sample_is_reproducible_and_independent_of_input_order() -> None:
    ids = np.arange(1000, 3000)
    a = sample_pool(ids, 100, seed=7)
    b = sample_pool(np.random.default_rng(1).permutation(ids), 100, seed=7)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) == 100 and np.all(np.isin(a, ids))
    assert not np.array_equal(a, sample_pool(ids, 100, seed=8))
    np.testing.assert_array_equal(sample_pool(ids[::-1], 5000, seed=1), ids)


def test_sample_is_uniform() -> None:
    # Fixed seeds: the statistic is a constant, so the test cannot flake.
    ids = np.arange(40)
    counts = np.zeros(ids.size)
    for seed in range(2000):
        counts[sample_pool(ids, 10, seed)] += 1
    assert stats.chisquare(counts).pvalue > 0.01


def test_sample_rejects_repeated_ids() -> None:
    with pytest.raises(ValueError, match="repeats"):
        sample_pool(np.array([1, 2, 2]), 1, 0)


def test_random_baseline_size_matches_cst_al() -> None:
    P = np.random.default_rng(3).dirichlet(np.full(6, 0.4), size=500)
    params = SelectionParams()
    want = sum(select("cst+al", P, params, 0).counts_by_kind().values())
    for strategy in ("random", "least_confidence", "entropy"):
        chosen = select(strategy, P, params, seed=5)
        assert chosen.al.size == want and chosen.cst.size == 0
    np.testing.assert_array_equal(select_random(10, 20, 0), np.arange(10))
    assert select("random", P, SelectionParams(budget=3), 0).al.size == 3


def test_uncertainty_baselines() -> None:
    P = np.array([[0.9, 0.05, 0.05], [0.4, 0.3, 0.3], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    np.testing.assert_array_equal(select_least_confidence(P, 2), [1, 2])
    np.testing.assert_array_equal(select_entropy(P, 1), [1])
    assert entropy(P)[3] == 0.0


def test_cap_keeps_highest_priority_per_class() -> None:
    pred = np.array([0, 0, 0, 1, 1, 2])
    p1 = np.array([0.91, 0.99, 0.95, 0.92, 0.97, 0.9])
    kept = cap_per_class(np.arange(6), pred, cap=2, priority=p1)
    np.testing.assert_array_equal(kept, [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(cap_per_class(np.arange(6), pred, None, p1), np.arange(6))
    # AL: smallest margin first, via negated margin.
    m = np.array([0.1, 0.01, 0.05, 0.0, 0.0, 0.1])
    np.testing.assert_array_equal(cap_per_class([0, 1, 2, 3, 4], pred, 1, -m), [1, 3])


@settings(max_examples=50, deadline=None)
@given(probability_matrices(), st.integers(1, 5))
def test_cap_through_select(case, cap) -> None:
    P, t, m = case
    chosen = select("cst+al", P, SelectionParams(threshold=t, margin=m, cap=cap), 0)
    for rows in (chosen.cst, chosen.al):
        assert np.bincount(chosen.suggested_class[rows], minlength=1).max(initial=0) <= cap


def test_selection_record() -> None:
    P = np.array([[0.95, 0.05], [0.55, 0.45], [0.05, 0.95], [0.7, 0.3]])
    chosen = select("cst+al", P, SelectionParams(), 0)
    assert chosen.counts_by_kind() == {"cst": 2, "al": 1, "st": 0}
    assert chosen.counts_by_class(["A", "B"])["cst"] == {"A": 1, "B": 1}
    assert chosen.top_classes.shape == (4, 2) and chosen.top_probs[1, 1] == 0.45


def test_params_validation_and_unknown_strategy() -> None:
    for kwargs, field in (
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"margin": 0.0}, "margin"),
        ({"cap": 0}, "cap"),
    ):
        with pytest.raises(ValueError, match=field):
            SelectionParams(**kwargs)
    with pytest.raises(ValueError, match="bogus.*cst\\+al"):
        select("bogus", np.array([[1.0, 0.0]]), SelectionParams(), 0)
    assert set(STRATEGIES) == {"cst", "al", "cst+al", "st", "random", "least_confidence", "entropy"}
