"""How a model version is scored, as the study reports it.

Nakamura et al. (Sci Rep 12:16736, 2022): accuracy, per-class recall and precision,
their means, and a confusion matrix on the test set, over 16 evaluation classes
(bare nuclei and artifacts merged; ``Taxonomy.eval_merge`` says which classes merge).
Beside them, balanced accuracy (the mean recall: every class weighs the same, however
many cells it has) and macro-F1 (the mean of per-class ``2TP / (2TP + FP + FN)``),
because accuracy alone flatters a model that is good on the common classes.
The round comparison uses one-way ANOVA with Tukey's HSD (their Table 2).

Undefined ratios are NaN, never 0: a class absent from the truth has no recall and a
class never predicted has no precision. Zero would read as "always wrong" and drag
the means; NaN says "no evidence". The means are over the classes where the ratio is
defined, and are NaN only when no class is. ``to_json`` writes NaN as ``null``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

from bmcell.taxonomy import Taxonomy


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.full(numerator.shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _defined_mean(values: np.ndarray) -> float:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else math.nan


def _json_number(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


@dataclass(frozen=True)
class Evaluation:
    """Scores over evaluation classes; ``confusion[i, j]`` counts truth ``i`` predicted ``j``."""

    codes: tuple[str, ...]
    confusion: np.ndarray
    accuracy: float
    recall: np.ndarray
    precision: np.ndarray
    mean_recall: float
    mean_precision: float
    f1: np.ndarray
    macro_f1: float

    @property
    def balanced_accuracy(self) -> float:
        """Mean recall over the classes present in the truth."""
        return self.mean_recall

    @property
    def n(self) -> int:
        return int(self.confusion.sum())

    def to_json(self) -> dict:
        return {
            "codes": list(self.codes),
            "n": self.n,
            "accuracy": _json_number(self.accuracy),
            "mean_recall": _json_number(self.mean_recall),
            "mean_precision": _json_number(self.mean_precision),
            "balanced_accuracy": _json_number(self.balanced_accuracy),
            "macro_f1": _json_number(self.macro_f1),
            "recall": {c: _json_number(v) for c, v in zip(self.codes, self.recall, strict=True)},
            "precision": {
                c: _json_number(v) for c, v in zip(self.codes, self.precision, strict=True)
            },
            "f1": {c: _json_number(v) for c, v in zip(self.codes, self.f1, strict=True)},
            "confusion": self.confusion.tolist(),
        }


def merged_hits(y_true_idx, y_pred_idx, eval_index_map) -> int:
    """How many predictions are right once classes are merged for evaluation.

    ``eval_index_map[i]`` is training class ``i``'s evaluation class
    (``Taxonomy.eval_index_map``). The training loop picks its best epoch with this and
    ``evaluate`` derives its accuracy from it, so the epoch chosen and the gate applied
    to the published version read the same number.
    """
    to_eval = np.asarray(eval_index_map, dtype=np.int64)
    y_true = np.asarray(y_true_idx, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred_idx, dtype=np.int64).ravel()
    return int((to_eval[y_true] == to_eval[y_pred]).sum())


def evaluate(y_true_idx: np.ndarray, y_pred_idx: np.ndarray, taxonomy: Taxonomy) -> Evaluation:
    """Score predictions given as training-class indices, after the evaluation merge.

    A merged class (BN+ART) counts a BN cell predicted as ART as correct: the study
    scores them as one class because their distinction does not enter a count.
    """
    y_true = np.asarray(y_true_idx, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred_idx, dtype=np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} labels but y_pred has {y_pred.size}")
    if y_true.size == 0:
        raise ValueError("nothing to evaluate: y_true is empty")
    k = taxonomy.num_classes
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.min() < 0 or y.max() >= k:
            raise ValueError(f"{name} holds class indices outside [0, {k}) for {taxonomy.name!r}")
    to_eval = np.asarray(taxonomy.eval_index_map(), dtype=np.int64)
    codes = tuple(taxonomy.eval_codes)
    m = len(codes)
    confusion = np.bincount(to_eval[y_true] * m + to_eval[y_pred], minlength=m * m).reshape(m, m)
    hits = np.diag(confusion).astype(np.float64)
    recall = _ratio(hits, confusion.sum(axis=1).astype(np.float64))
    precision = _ratio(hits, confusion.sum(axis=0).astype(np.float64))
    # 2TP / (2TP + FP + FN): 0 for a class in the truth never predicted right, undefined
    # only for a class neither in the truth nor predicted (sklearn's convention).
    f1 = _ratio(2 * hits, confusion.sum(axis=1) + confusion.sum(axis=0).astype(np.float64))
    return Evaluation(
        codes=codes,
        confusion=confusion,
        accuracy=merged_hits(y_true, y_pred, to_eval) / y_true.size,
        recall=recall,
        precision=precision,
        mean_recall=_defined_mean(recall),
        mean_precision=_defined_mean(precision),
        f1=f1,
        macro_f1=_defined_mean(f1),
    )


def plot_confusion(evaluation: Evaluation, path: str | Path, title: str) -> Path:
    """Write the confusion matrix as a PNG: colour is the row-normalised rate, text the count.

    Built on a bare ``Figure`` with the Agg canvas, so it needs no display and leaves
    pyplot's global state alone (safe inside a service).
    """
    cm = evaluation.confusion
    rows = cm.sum(axis=1, keepdims=True)
    rate = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    m = len(evaluation.codes)
    fig = Figure(figsize=(1.0 + 0.5 * m, 1.0 + 0.45 * m), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(rate, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ticks = np.arange(m)
    ax.set_xticks(ticks, evaluation.codes, rotation=90)
    ax.set_yticks(ticks, evaluation.codes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}\naccuracy {evaluation.accuracy:.4f}, n = {evaluation.n}")
    for i, j in zip(*np.nonzero(cm), strict=True):
        ax.text(
            j,
            i,
            str(cm[i, j]),
            ha="center",
            va="center",
            fontsize=7,
            color="white" if rate[i, j] > 0.5 else "black",
        )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def anova_tukey(groups: dict[str, list[float]]) -> dict:
    """One-way ANOVA across groups, then Tukey's HSD for every pair.

    The study compares strategies (CST, AL, CST+AL) this way. ``scipy.stats.tukey_hsd``
    handles unequal group sizes (the Tukey-Kramer form the paper names). Returns
    ``{"groups", "f", "p", "pairs": [{"a", "b", "mean_diff", "p", "ci_low", "ci_high"}]}``
    where ``mean_diff`` is mean(a) - mean(b).
    """
    names = list(groups)
    if len(names) < 2:
        raise ValueError(f"need at least two groups to compare, got {names}")
    samples = [np.asarray(groups[name], dtype=np.float64) for name in names]
    for name, sample in zip(names, samples, strict=True):
        if sample.size < 2:
            raise ValueError(f"group {name!r} needs at least two values, got {sample.size}")
    anova = stats.f_oneway(*samples)
    tukey = stats.tukey_hsd(*samples)
    ci = tukey.confidence_interval()
    pairs = [
        {
            "a": names[i],
            "b": names[j],
            "mean_diff": float(tukey.statistic[i, j]),
            "p": float(tukey.pvalue[i, j]),
            "ci_low": float(ci.low[i, j]),
            "ci_high": float(ci.high[i, j]),
        }
        for i in range(len(names))
        for j in range(i + 1, len(names))
    ]
    return {"groups": names, "f": float(anova.statistic), "p": float(anova.pvalue), "pairs": pairs}
