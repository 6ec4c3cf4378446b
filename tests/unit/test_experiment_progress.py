"""The experiment's per-strategy log: what a resumed run needs, and refusing a mismatch."""

from __future__ import annotations

import pytest

from bmcell.experiment import ExperimentConfig, ExperimentError, StrategyLog, fingerprint
from bmcell.review_sim import ReviewStats
from bmcell.studyreport import RoundResult, cost_rows
from bmcell.v1 import rounds_pb2


def _round(round_id: int, acc: float) -> rounds_pb2.Round:
    return rounds_pb2.Round(
        round_id=round_id,
        state="published",
        test_accuracy=acc,
        validation_accuracy=acc - 0.01,
        labels_added=40,
        labels_added_by_class={"NEU": 30, "LY": 10},
        promoted=True,
        model_out=round_id + 1,
    )


def test_a_log_written_mid_round_resumes_with_its_counts(tmp_path) -> None:
    cfg = ExperimentConfig(strategies=["cst"], rounds=3, out=tmp_path)
    path = tmp_path / "progress" / "exp_cst.json"
    log = StrategyLog(path, "cst", fingerprint(cfg))
    assert not log.started
    log.finish(
        _round(7, 0.9), ReviewStats(reviews=12, confirms=10, corrections=2), {"training": 5.0}
    )
    log.live(8, ReviewStats(reviews=3, confirms=3), {"predicting": 1.5})

    again = StrategyLog(path, "cst", fingerprint(cfg))
    assert again.started and again.current["round_id"] == 8
    assert again.current["stats"]["reviews"] == 3
    again.finish(_round(8, 0.92), ReviewStats(reviews=5, corrections=5), {"training": 4.0})
    assert again.current is None
    boot = RoundResult(round=0, test_accuracy=0.8, validation_accuracy=0.8, added=0)
    results = again.results(boot)
    assert [r.round for r in results] == [0, 1, 2]
    assert results[2].test_accuracy == pytest.approx(0.92)
    assert results[1].added_by_class == {"NEU": 30, "LY": 10}
    effort = again.effort()
    assert (effort.reviews, effort.confirms, effort.corrections) == (17, 10, 7)
    assert StrategyLog(path, "cst", fingerprint(cfg)).rounds == again.rounds


def test_a_log_of_other_settings_is_refused(tmp_path) -> None:
    path = tmp_path / "progress" / "exp_al.json"
    StrategyLog(path, "al", fingerprint(ExperimentConfig(["al"], 2, tmp_path, sample=500))).save()
    with pytest.raises(ExperimentError, match="other settings"):
        StrategyLog(path, "al", fingerprint(ExperimentConfig(["al"], 2, tmp_path, sample=600)))


def test_cost_rows_have_every_stage_and_a_total() -> None:
    rows = cost_rows(
        {"cst": [{"predicting": 2.0, "training": 30.04}, {"reviewing": 1.0}]},
        {"uploads": 100.0},
    )
    assert rows[0] == {
        "strategy": "setup",
        "round": "uploads",
        "created": None,
        "predicting": None,
        "selecting": None,
        "reviewing": None,
        "training": None,
        "evaluating": None,
        "total": 100.0,
    }
    assert rows[1]["training"] == 30.0 and rows[1]["total"] == 32.0
    assert list(rows[1]) == list(rows[0]) and rows[2]["round"] == 2
