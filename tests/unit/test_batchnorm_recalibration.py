"""Precise BatchNorm statistics before every validation pass (services/trainer/loop.py)."""

from __future__ import annotations

import torch
from torch import nn

from bmcell.network import CellClassifier
from services.trainer.loop import recalibrate_batchnorm


def test_statistics_are_the_exact_moments_of_the_calibration_cells() -> None:
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    model = nn.Sequential(conv, bn).eval()
    bn.running_mean.fill_(5.0)  # stale values from training
    x = torch.rand(100, 3, 8, 8)
    weights = {
        k: v.clone()
        for k, v in model.state_dict().items()
        if "running" not in k and "batches" not in k
    }

    recalibrate_batchnorm(model, x, batch=50)  # equal batches: the mean of means is exact

    with torch.no_grad():
        features = conv(x)
    assert torch.allclose(bn.running_mean, features.mean(dim=(0, 2, 3)), atol=1e-5)
    # The cumulative average of per-batch unbiased variances, close to the pooled one.
    assert torch.allclose(bn.running_var, features.var(dim=(0, 2, 3)), rtol=0.05)
    assert bn.momentum == 0.1 and not model.training
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_predictions_no_longer_depend_on_the_last_training_batches() -> None:
    torch.manual_seed(1)
    model = CellClassifier(5)
    x = torch.rand(64, 3, 32, 32)
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 3, 32, 32) * 0.2)  # a skewed last training batch
    recalibrate_batchnorm(model, x)
    model.eval()
    first = model(x).detach()
    with torch.no_grad():
        model.train()
        model(torch.rand(16, 3, 32, 32) * 0.2)
    recalibrate_batchnorm(model, x)
    model.eval()
    assert torch.allclose(model(x).detach(), first, atol=1e-5)


def test_calibration_cells_are_a_seeded_random_draw_not_the_oldest() -> None:
    from services.trainer.loop import BN_CALIBRATION_CELLS, calibration_sample

    first = calibration_sample(5_000, seed=3)
    assert first == calibration_sample(5_000, seed=3)  # a resumed run: the same cells
    assert len(first) == len(set(first)) == BN_CALIBRATION_CELLS
    assert first != list(range(BN_CALIBRATION_CELLS))  # not the first by id
    assert max(first) > 2_500  # drawn over the whole list
    assert calibration_sample(5_000, seed=4) != first  # another round, another draw
    assert calibration_sample(100, seed=3) == list(range(100))  # fewer cells: all of them
