"""The cell classifier of the study (Nakamura et al. 2022, Fig. 10).

Eight 2-D convolution layers, each followed by batch normalisation, grouped in four
stages of two; every stage ends with a squeeze-and-excitation block and max pooling.
A global average pool and a linear layer give one logit per taxonomy class; the
exported (served) model appends the softmax so Triton returns probabilities.

Crops are stored at 282x282; the network takes any square size divisible by 16.
On CPU the default input is 64x64 (``DEFAULT_INPUT_SIZE``), taken from the centre
192 px of the crop (``bmcell.preprocess``): the classes differ in nucleus shape,
colour and granules, which survive that downscale, and training is about 20x
cheaper than at 282.
"""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_INPUT_SIZE = 64
# The paper's figure gives no channel counts we can read; these are sized for CPU
# training (about 50M multiply-adds per 64 px image, a quarter of 32..256), which on
# 2 cores trains a round in minutes and reaches the 0.80 gate from the bootstrap.
STAGE_CHANNELS = (16, 32, 64, 128)


class SqueezeExcitation(nn.Module):
    """Channel attention (Hu et al.): global pool, bottleneck MLP, sigmoid gate."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(self.pool(x))


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class CellClassifier(nn.Module):
    """Returns logits of shape (N, num_classes) for float images (N, 3, H, W) in [0, 1]."""

    def __init__(self, num_classes: int, dropout: float = 0.3) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in STAGE_CHANNELS:
            layers += [_conv_bn(c_in, c_out), _conv_bn(c_out, c_out), SqueezeExcitation(c_out)]
            layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(c_in, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class WithSoftmax(nn.Module):
    """The served form: probabilities instead of logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=1)
