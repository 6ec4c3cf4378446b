"""The study's training-time augmentation as one batched affine resample.

Nakamura et al. (Sci Rep 12:16736, 2022), Methods, "Data augmentation": input images
"were randomly rotated from 0 to 360 degrees, vertically and horizontally reversed,
and vertically and horizontally shifted by 12.5%". Here each image of a batch gets
its own rotation (uniform in ``rotation_deg``), horizontal and vertical flips (each
with probability ``flip_p``) and x / y shifts (uniform in ``±max_shift`` of the
side). The three compose into one 2x3 matrix per image, so the whole batch is one
``affine_grid`` + ``grid_sample`` call: a single interpolation, not three, and no
Python loop over images.

Pixels that come from outside the crop take the background value, not black: the
segmenter's crops have the extracellular area painted with the background, and a
black wedge at the corners would be a feature the model could learn.

Randomness comes only from the ``torch.Generator`` passed in, so a seeded generator
reproduces a batch exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentParams:
    """Ranges of the random transform. The defaults are the study's.

    ``rotation_deg`` is a ``(low, high)`` range; a positive angle turns the image
    counter-clockwise as displayed (row 0 at the top). ``max_shift`` is a fraction of
    the side. All zero (``(0, 0)``, ``0``, ``0``) is the identity.
    """

    rotation_deg: tuple[float, float] = (0.0, 360.0)
    flip_p: float = 0.5
    max_shift: float = 0.125

    def __post_init__(self) -> None:
        low, high = self.rotation_deg
        if low > high:
            raise ValueError(
                f"rotation_deg must be (low, high) with low <= high, got {self.rotation_deg}"
            )
        if not 0.0 <= self.flip_p <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {self.flip_p}")
        if not 0.0 <= self.max_shift <= 1.0:
            raise ValueError(f"max_shift must be in [0, 1], got {self.max_shift}")


def random_affine(
    n: int, generator: torch.Generator, params: AugmentParams = AugmentParams()
) -> torch.Tensor:
    """Draw ``n`` transforms as ``affine_grid`` matrices, shape ``(n, 2, 3)``, float64.

    ``affine_grid`` maps each output position to the input position it reads, so the
    matrix is the inverse of the forward transform ``p_out = R · Fl · p_in + t``:
    ``p_in = Fl · Rᵀ · (p_out - t)`` (a flip is its own inverse). Coordinates are
    normalised to ``[-1, 1]`` with y pointing down, so a shift of ``s`` of the side
    is ``2 s`` there.
    """
    g = dict(generator=generator, dtype=torch.float64)
    low, high = params.rotation_deg
    angle = torch.deg2rad(low + (high - low) * torch.rand(n, **g))
    flip_x = torch.where(torch.rand(n, **g) < params.flip_p, -1.0, 1.0).to(torch.float64)
    flip_y = torch.where(torch.rand(n, **g) < params.flip_p, -1.0, 1.0).to(torch.float64)
    shift = (2.0 * torch.rand(n, 2, **g) - 1.0) * (2.0 * params.max_shift)

    # Counter-clockwise on screen is R(-angle) in y-down coordinates; its transpose is
    # R(angle): [[cos, -sin], [sin, cos]].
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot_t = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    flips = torch.stack([flip_x, flip_y], -1).unsqueeze(-1)  # diag(Fl) · M scales rows
    linear = flips * rot_t
    offset = -(linear @ shift.unsqueeze(-1))
    return torch.cat([linear, offset], dim=-1)


def augment(
    images: torch.Tensor,
    generator: torch.Generator,
    params: AugmentParams = AugmentParams(),
    fill: float | Sequence[float] | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Randomly rotate, flip and shift a batch ``(N, C, S, S)``; same shape out.

    ``fill`` is the background value, one number or one per channel, in the images'
    own scale. ``generator`` should live on the CPU; the draws move to the images'
    device.
    """
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be (N, C, S, S), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a floating tensor, got {images.dtype}")
    n, c = images.shape[:2]
    if n == 0:
        return images
    theta = random_affine(n, generator, params).to(device=images.device, dtype=images.dtype)
    background = torch.as_tensor(fill, dtype=images.dtype, device=images.device).reshape(-1)
    if background.numel() not in (1, c):
        raise ValueError(
            f"fill must be one value or {c} (one per channel), got {background.numel()}"
        )
    background = background.reshape(1, -1, 1, 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # grid_sample pads with zeros; shifting by the background first makes those zeros
    # the background once it is added back.
    out = F.grid_sample(
        images - background, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return out + background


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator for :func:`augment`, seeded so a run can be replayed."""
    return torch.Generator().manual_seed(seed)
