"""Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017).

One scalar ``T > 0`` per model version, fitted on the validation split at publish by
minimising the negative log-likelihood of ``softmax(logits / T)``; the classifier
applies it before probabilities leave it. Dividing the logits by one positive scalar
never changes a row's argmax, so accuracy is untouched; only confidence moves.

The classifier's Triton model returns softmax probabilities, not logits. Since
``softmax(z) = exp(z - logsumexp(z))``, ``log softmax(z)`` differs from ``z`` by a
per-row constant, and softmax is invariant to such a shift: ``softmax(log p / T) ==
softmax(z / T)``. So :func:`apply` works from probabilities, exactly up to float
rounding (a probability that underflowed to 0 in float32 is clipped to
``TINY`` before the log; such a class stays negligible after scaling for any
``T`` the fit returns, which is bounded to ``[T_MIN, T_MAX]``).

Expected calibration error (:func:`ece`): 15 equal-width confidence bins over the
top-1 probability, ``sum_b |B_b| / n * |acc(B_b) - conf(B_b)|`` (Guo et al. 2017;
Naeini et al. 2015). Bins are ``(k/15, (k+1)/15]``, the first also holds 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

N_BINS = 15
T_MIN, T_MAX = 0.05, 20.0
TINY = 1e-30


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(_log_softmax(np.asarray(z, dtype=np.float64)))


def logits_from_probabilities(P: np.ndarray) -> np.ndarray:
    """Logits up to a per-row constant (all softmax needs)."""
    return np.log(np.maximum(np.asarray(P, dtype=np.float64), TINY))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``softmax(logits / T)`` at the true labels."""
    ls = _log_softmax(np.asarray(logits, dtype=np.float64) / temperature)
    return float(-ls[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The ``T`` in ``[T_MIN, T_MAX]`` minimising NLL: golden-section search on ``log T``.

    NLL of temperature scaling is smooth and, in practice, unimodal in ``log T``; a
    coarse grid first brackets the minimum so a non-unimodal tail cannot mislead the
    search. Returns 1.0 for an empty set (nothing to fit: no change).
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or len(labels) != len(logits):
        raise ValueError(f"logits must be (n, C) with n labels, got {logits.shape}, {labels.shape}")
    if len(labels) == 0:
        return 1.0
    lo, hi = np.log(T_MIN), np.log(T_MAX)
    grid = np.linspace(lo, hi, 41)
    values = [nll(logits, labels, float(np.exp(g))) for g in grid]
    i = int(np.argmin(values))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    phi = (np.sqrt(5) - 1) / 2
    c, d = b - phi * (b - a), a + phi * (b - a)
    fc, fd = nll(logits, labels, float(np.exp(c))), nll(logits, labels, float(np.exp(d)))
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - phi * (b - a)
            fc = nll(logits, labels, float(np.exp(c)))
        else:
            a, c, fc = c, d, fd
            d = a + phi * (b - a)
            fd = nll(logits, labels, float(np.exp(d)))
    return float(np.exp((a + b) / 2))


def apply(P: np.ndarray, temperature: float | None) -> np.ndarray:
    """``softmax(log P / T)`` in ``P``'s dtype; ``P`` unchanged for ``None`` or ``T == 1``."""
    P = np.asarray(P)
    if temperature is None or temperature == 1.0 or P.size == 0:
        return P
    out = softmax(logits_from_probabilities(P) / float(temperature))
    return out.astype(P.dtype if np.issubdtype(P.dtype, np.floating) else np.float64)


def ece(P: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> float:
    """Expected calibration error of probability rows ``P`` against ``labels``."""
    P = np.asarray(P, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return float("nan")
    conf = P.max(axis=1)
    correct = (P.argmax(axis=1) == labels).astype(np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            total += m.sum() / len(labels) * abs(correct[m].mean() - conf[m].mean())
    return float(total)


@dataclass(frozen=True)
class Calibration:
    """What publish stores under the version's ``metrics["calibration"]``."""

    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    n: int
    bins: int = N_BINS
    split: str = "validation"

    def to_json(self) -> dict:
        return asdict(self)


def calibrate(logits: np.ndarray, labels: np.ndarray) -> Calibration:
    """Fit ``T`` on ``(logits, labels)`` and report ECE and NLL before and after."""
    logits = np.asarray(logits, dtype=np.float64)
    t = fit_temperature(logits, labels)
    return Calibration(
        temperature=t,
        ece_before=ece(softmax(logits), labels),
        ece_after=ece(softmax(logits / t), labels),
        nll_before=nll(logits, labels, 1.0),
        nll_after=nll(logits, labels, t),
        n=int(len(labels)),
    )


def temperature_of(row: dict | None) -> float | None:
    """The temperature stored with a ``model_versions`` row, or ``None`` (uncalibrated)."""
    if not row:
        return None
    cal = (row.get("metrics") or {}).get("calibration") or {}
    t = cal.get("temperature")
    return float(t) if t is not None and t > 0 else None
