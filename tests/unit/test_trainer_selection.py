"""The epoch the training loop keeps and the gate at publish read the same number:
validation accuracy on evaluation classes (BN and ART merged)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bmcell.evaluation import evaluate
from bmcell.taxonomy import DEFAULT_TAXONOMY as T
from services.trainer.loop import is_better, validation_hits


class Fixed(nn.Module):
    """Predicts the given classes, whatever the input."""

    def __init__(self, predictions: list[int]) -> None:
        super().__init__()
        self.predictions = predictions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.tensor(self.predictions), T.num_classes).float()


def test_best_epoch_and_gate_use_the_merged_validation_accuracy() -> None:
    bn, art, mb, ly = (T.index(c) for c in ("BN", "ART", "MB", "LY"))
    truth = [bn, bn, art, mb, ly, ly]
    # Epoch 1 swaps BN and ART (right on evaluation classes, wrong on training ones);
    # epoch 2 gets one 17-class hit more but two real mistakes.
    epochs = {1: [art, art, bn, mb, ly, mb], 2: [bn, art, art, ly, mb, ly]}
    x, labels = torch.zeros(len(truth), 3, 8, 8), torch.tensor(truth)
    best = None
    for epoch, pred in epochs.items():
        right, seen = validation_hits(Fixed(pred), x, labels, T.eval_index_map())
        record = {"epoch": epoch, "validation_accuracy": right / seen}
        # What publish gates on: bmcell.evaluation.evaluate of the same predictions.
        assert record["validation_accuracy"] == evaluate(truth, pred, T).accuracy
        if is_better(record, best):
            best = record
    seventeen = {e: float(np.mean(np.equal(p, truth))) for e, p in epochs.items()}
    assert seventeen[2] > seventeen[1]  # the 17-class measure would have kept epoch 2
    assert best == {"epoch": 1, "validation_accuracy": 5 / 6}
