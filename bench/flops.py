"""FLOP per item of the real networks, counted by ``torch.utils.flop_counter``.

The counter charges a multiply-add as 2 FLOP (matrix products and convolutions;
elementwise work is not counted, so a fraction of the floor is an upper bound on
how close to the machine a path is). Training a sample costs about 3 forward
passes (forward, and a backward of about twice the forward).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from bmcell.network import DEFAULT_INPUT_SIZE, CellClassifier
from bmcell.taxonomy import DEFAULT_TAXONOMY
from services.segmenter import unet

TRAINING_PER_FORWARD = 3.0


def counted(fn) -> int:  # noqa: ANN001 - any zero-argument callable running torch ops
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def classifier_forward(input_size: int = DEFAULT_INPUT_SIZE) -> float:
    """One cell through ``CellClassifier`` at ``input_size`` (per cell of a batch of 8)."""
    model = CellClassifier(DEFAULT_TAXONOMY.num_classes).eval()
    x = torch.zeros(8, 3, input_size, input_size)
    with torch.inference_mode():
        return counted(lambda: model(x)) / 8


def classifier_training(input_size: int = DEFAULT_INPUT_SIZE) -> float:
    return TRAINING_PER_FORWARD * classifier_forward(input_size)


def segmenter_field(size: int = 704) -> float:
    """One ``size`` x ``size`` field through the segmenter's U-Net the way the service
    runs it (``unet.predict_probabilities``: at the network's own scale)."""
    model = unet.UNet().eval()
    image = np.full((size, size, 3), 200, dtype=np.uint8)
    return float(counted(lambda: unet.predict_probabilities(model, image)))
