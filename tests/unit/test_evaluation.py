"""Evaluation with the BN+ART merge, the confusion plot, and the strategy statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bmcell.evaluation import anova_tukey, evaluate, plot_confusion
from bmcell.taxonomy import DEFAULT_TAXONOMY, CellClass, Taxonomy

T = DEFAULT_TAXONOMY
BN, ART, MB, LY = T.index("BN"), T.index("ART"), T.index("MB"), T.index("LY")

SMALL = Taxonomy(
    name="toy",
    classes=(CellClass("A", "a"), CellClass("B", "b"), CellClass("C", "c"), CellClass("D", "d")),
    eval_merge={"C": "C+D", "D": "C+D"},
)


def test_bn_and_art_merge_into_one_class() -> None:
    result = evaluate([BN, ART, BN, MB], [ART, BN, BN, MB], T)
    assert len(result.codes) == 16 and "BN+ART" in result.codes
    assert result.accuracy == 1.0
    k = result.codes.index("BN+ART")
    assert result.confusion[k, k] == 3


def test_known_confusion_matrix() -> None:
    # Truth A A A B B C D D; predicted A B A B A D C B.
    y_true = [0, 0, 0, 1, 1, 2, 3, 3]
    y_pred = [0, 1, 0, 1, 0, 3, 2, 1]
    result = evaluate(y_true, y_pred, SMALL)
    assert result.codes == ("A", "B", "C+D")
    np.testing.assert_array_equal(result.confusion, [[2, 1, 0], [1, 1, 0], [0, 1, 2]])
    assert result.accuracy == pytest.approx(5 / 8)
    np.testing.assert_allclose(result.recall, [2 / 3, 1 / 2, 2 / 3])
    np.testing.assert_allclose(result.precision, [2 / 3, 1 / 3, 1.0])
    assert result.mean_recall == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)


def test_absent_classes_are_nan_and_skipped_by_the_means() -> None:
    # No B in the truth, nothing predicted as C+D.
    result = evaluate([0, 0, 2], [0, 1, 1], SMALL)
    assert math.isnan(result.recall[1]) and math.isnan(result.precision[2])
    assert result.mean_recall == pytest.approx((1 / 2 + 0.0) / 2)
    assert result.mean_precision == pytest.approx((1.0 + 0.0) / 2)
    data = json.loads(json.dumps(result.to_json()))  # strict JSON: no NaN literals
    assert data["recall"]["B"] is None and data["n"] == 3


def test_misuse_is_rejected() -> None:
    with pytest.raises(ValueError, match="empty"):
        evaluate([], [], SMALL)
    with pytest.raises(ValueError, match="y_pred"):
        evaluate([0], [7], SMALL)
    with pytest.raises(ValueError, match="labels"):
        evaluate([0, 1], [0], SMALL)


def test_plot_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, T.num_classes, 400)
    y_pred = np.where(rng.random(400) < 0.8, y_true, rng.integers(0, T.num_classes, 400))
    out = plot_confusion(evaluate(y_true, y_pred, T), tmp_path / "plots" / "cm.png", "round 3")
    assert out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_anova_tukey() -> None:
    rng = np.random.default_rng(1)
    groups = {
        "cst": list(rng.normal(0.90, 0.01, 25)),
        "al": list(rng.normal(0.90, 0.01, 25)),
        "cst+al": list(rng.normal(0.94, 0.01, 25)),
    }
    report = anova_tukey(groups)
    assert report["groups"] == ["cst", "al", "cst+al"] and report["p"] < 1e-6
    pairs = {(p["a"], p["b"]): p for p in report["pairs"]}
    assert len(pairs) == 3
    assert pairs[("cst", "cst+al")]["p"] < 1e-3 and pairs[("cst", "cst+al")]["mean_diff"] < 0
    assert pairs[("cst", "al")]["ci_low"] < 0 < pairs[("cst", "al")]["ci_high"]
    with pytest.raises(ValueError, match="two groups"):
        anova_tukey({"cst": [1.0, 2.0]})


def test_balanced_accuracy_and_macro_f1_by_hand() -> None:
    # The confusion above: [[2, 1, 0], [1, 1, 0], [0, 1, 2]].
    result = evaluate([0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 0, 1, 0, 3, 2, 1], SMALL)
    # Recall 2/3, 1/2, 2/3; F1 = 2TP / (row + column) = 4/6, 2/5, 4/5.
    assert result.balanced_accuracy == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    np.testing.assert_allclose(result.f1, [2 / 3, 2 / 5, 4 / 5])
    assert result.macro_f1 == pytest.approx(28 / 45)
    data = result.to_json()
    assert data["balanced_accuracy"] == pytest.approx(11 / 18)
    assert data["macro_f1"] == pytest.approx(28 / 45)
    assert data["f1"]["B"] == pytest.approx(0.4)


def test_a_class_predicted_but_absent_scores_f1_zero_and_no_recall() -> None:
    # Truth A A, predicted A B: B has no recall (absent) but an F1 of 0 (a false
    # positive); C+D is in neither and counts in no mean.
    result = evaluate([0, 0], [0, 1], SMALL)
    assert result.accuracy == 0.5 and result.balanced_accuracy == 0.5
    assert result.f1[1] == 0.0 and math.isnan(result.f1[2])
    assert result.macro_f1 == pytest.approx((2 / 3 + 0.0) / 2)


def test_merged_hits_counts_bn_for_art_as_right() -> None:
    from bmcell.evaluation import merged_hits

    truth, pred = [BN, ART, MB, LY], [ART, ART, LY, LY]
    assert merged_hits(truth, pred, T.eval_index_map()) == 3
    assert evaluate(truth, pred, T).accuracy == 3 / 4
