"""Deadlines of calls that predict cells grow with the cells they cover."""

from __future__ import annotations

import pytest

from bmcell.settings import RoundsSettings, SelectorSettings
from services.rounds.server import selection_deadline_s

ADDRS = {
    "database_url": "postgresql://u@h/db",
    "s3_endpoint": "h:1",
    "classifier_addr": "h:2",
    "selector_addr": "h:3",
    "trainer_addr": "h:4",
}


def test_prediction_deadline_follows_the_cells() -> None:
    s = SelectorSettings(**ADDRS, outbound_timeout_s=30, predict_cells_per_s=50)
    assert s.prediction_deadline_s(0) == 30
    assert s.prediction_deadline_s(5000) == pytest.approx(130)


def test_selection_deadline_covers_its_sample_prediction() -> None:
    s = RoundsSettings(**ADDRS, outbound_timeout_s=30, predict_cells_per_s=50)
    small = selection_deadline_s(s, {"sample_size": 1250})
    default = selection_deadline_s(s, {})  # the selector's default sample: 5,000
    assert small == pytest.approx(s.selection_timeout_s + 30 + 25)
    assert default == pytest.approx(s.selection_timeout_s + 30 + 100)
    # A selection's deadline outlasts the PredictPool deadline the selector gives its sample.
    assert default > SelectorSettings(**ADDRS).prediction_deadline_s(5000)
