"""Detection quality against a synthetic manifest's truth masks.

A predicted cell matches a true cell when their masks' IoU is above 0.5 (such a
match is one-to-one). Precision is matches over predicted cells, recall matches over
true cells, F1 their harmonic mean; mean IoU is over matched pairs. True cells
smaller than ``instances.MIN_CELL_AREA`` pixels (slivers at the border) are left out,
as the segmenter drops predictions that small; border cells are counted otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from services.segmenter import instances, unet

IOU_THRESHOLD = 0.5


@dataclass
class Detection:
    true_cells: int = 0
    predicted: int = 0
    matched: int = 0
    ious: list[float] = field(default_factory=list)

    def add(self, other: Detection) -> None:
        self.true_cells += other.true_cells
        self.predicted += other.predicted
        self.matched += other.matched
        self.ious += other.ious

    @property
    def precision(self) -> float:
        return self.matched / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.matched / self.true_cells if self.true_cells else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def mean_iou(self) -> float:
        return float(np.mean(self.ious)) if self.ious else 0.0

    def to_json(self) -> dict:
        return {
            "true_cells": self.true_cells,
            "predicted": self.predicted,
            "matched": self.matched,
            "precision": round(self.precision, 4),
            "recall": round(self.recall, 4),
            "f1": round(self.f1, 4),
            "mean_matched_iou": round(self.mean_iou, 4),
        }


def compare(predicted: np.ndarray, truth: np.ndarray) -> Detection:
    """Match two instance maps (0 = background) of the same field."""
    truth = truth.astype(np.int64)
    t_sizes = np.bincount(truth.ravel())
    ignored = np.flatnonzero(t_sizes < instances.MIN_CELL_AREA)
    truth = np.where(np.isin(truth, ignored), 0, truth)
    predicted = predicted.astype(np.int64)
    nt, np_ = int(truth.max()) + 1, int(predicted.max()) + 1
    t_sizes = np.bincount(truth.ravel(), minlength=nt)
    p_sizes = np.bincount(predicted.ravel(), minlength=np_)
    both = (truth > 0) & (predicted > 0)
    inter = np.bincount(truth[both] * np_ + predicted[both], minlength=nt * np_).reshape(nt, np_)
    union = t_sizes[:, None] + p_sizes[None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    pairs = np.argwhere(iou > IOU_THRESHOLD)
    pairs = pairs[(pairs[:, 0] > 0) & (pairs[:, 1] > 0)]
    return Detection(
        true_cells=int((t_sizes[1:] > 0).sum()),
        predicted=int((p_sizes[1:] > 0).sum()),
        matched=len(pairs),
        ious=[float(iou[t, p]) for t, p in pairs],
    )


def segment(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    probs = unet.predict_probabilities(model, image)
    return instances.label_instances(probs)[0]


def evaluate(
    model: unet.UNet,
    fields: Iterable[tuple[Path, Path]],
    progress: Callable[[str, Detection], None] | None = None,
) -> Detection:
    """``fields``: (image, truth instance map) paths."""
    network = unet.for_inference(model)  # the graph the service's workers run
    total = Detection()
    for image_path, truth_path in fields:
        image = np.asarray(Image.open(image_path).convert("RGB"))
        one = compare(segment(network, image), np.asarray(Image.open(truth_path)))
        total.add(one)
        if progress is not None:
            progress(str(image_path), one)
    return total
