"""Temperature scaling (bmcell.calibration): fitted T lowers ECE and keeps the argmax."""

from __future__ import annotations

import numpy as np
import pytest

from bmcell import calibration


def _overconfident(n: int = 4000, c: int = 17, seed: int = 0):
    """Logits whose softmax is calibrated at T=1, then multiplied by 4: overconfident."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, size=(n, c))
    p = calibration.softmax(z)
    labels = np.array([rng.choice(c, p=row) for row in p])
    return z * 4.0, labels


def test_temperature_lowers_ece_and_keeps_argmax():
    logits, labels = _overconfident()
    cal = calibration.calibrate(logits, labels)
    assert cal.temperature == pytest.approx(4.0, rel=0.1)
    assert cal.ece_after < cal.ece_before / 3
    assert cal.nll_after < cal.nll_before
    scaled = calibration.softmax(logits / cal.temperature)
    assert np.array_equal(scaled.argmax(1), logits.argmax(1))


def test_underconfident_gets_t_below_one():
    logits, labels = _overconfident()
    cal = calibration.calibrate(logits / 16.0, labels)  # true scale 0.25: T ~ 0.25
    assert cal.temperature == pytest.approx(0.25, rel=0.1)
    assert cal.ece_after < cal.ece_before


def test_apply_from_probabilities_equals_softmax_of_scaled_logits():
    logits, _ = _overconfident(n=200)
    P = calibration.softmax(logits).astype(np.float32)
    out = calibration.apply(P, 2.5)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, calibration.softmax(logits / 2.5), atol=2e-5)
    assert np.array_equal(out.argmax(1), P.argmax(1))
    assert calibration.apply(P, None) is P


def test_ece_of_a_perfectly_calibrated_bin_is_zero():
    P = np.array([[0.75, 0.25]] * 4)
    assert calibration.ece(P, np.array([0, 0, 0, 1])) == pytest.approx(0.0)
    assert calibration.ece(P, np.array([0, 0, 0, 0])) == pytest.approx(0.25)


def test_temperature_of_row():
    assert calibration.temperature_of({"metrics": {}}) is None
    assert calibration.temperature_of({"metrics": {"calibration": {"temperature": 1.7}}}) == 1.7
    assert calibration.temperature_of(None) is None
