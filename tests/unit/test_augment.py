"""The batched rotation / flip / shift augmentation."""

from __future__ import annotations

import pytest
import torch

from services.trainer.augment import AugmentParams, augment, random_affine, seeded_generator

IDENTITY = AugmentParams(rotation_deg=(0.0, 0.0), flip_p=0.0, max_shift=0.0)


def single_pixel(size: int = 8, row: int = 2, col: int = 6) -> torch.Tensor:
    x = torch.zeros(1, 3, size, size)
    x[:, :, row, col] = 1.0
    return x


def lit(image: torch.Tensor) -> list[list[int]]:
    return (image[0, 0] > 0.5).nonzero().tolist()


def test_shape_kept_and_seed_reproduces() -> None:
    x = torch.rand(5, 3, 32, 32)
    a = augment(x, seeded_generator(11))
    b = augment(x, seeded_generator(11))
    assert a.shape == x.shape and a.dtype == x.dtype
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, augment(x, seeded_generator(12)))


def test_identity_when_all_ranges_are_zero() -> None:
    x = torch.rand(4, 3, 17, 17)
    torch.testing.assert_close(augment(x, seeded_generator(0), IDENTITY), x)


def test_rotated_single_pixel_moves_as_expected() -> None:
    # Row 2, col 6 of 8x8 is upper right of centre; 90 degrees counter-clockwise as
    # displayed takes it to upper left (row 1, col 2); 180 to lower left.
    x = single_pixel()
    quarter = AugmentParams(rotation_deg=(90.0, 90.0), flip_p=0.0, max_shift=0.0)
    assert lit(augment(x, seeded_generator(0), quarter)) == [[1, 2]]
    half = AugmentParams(rotation_deg=(180.0, 180.0), flip_p=0.0, max_shift=0.0)
    assert lit(augment(x, seeded_generator(0), half)) == [[5, 1]]


def test_flips_mirror_both_axes() -> None:
    both = AugmentParams(rotation_deg=(0.0, 0.0), flip_p=1.0, max_shift=0.0)
    assert lit(augment(single_pixel(), seeded_generator(0), both)) == [[5, 1]]


def test_transforms_stay_in_the_study_ranges() -> None:
    theta = random_affine(4000, seeded_generator(3))
    linear, offset = theta[:, :, :2], theta[:, :, 2]
    # Rotation and flips keep lengths: det is +-1 and the columns are unit length.
    torch.testing.assert_close(
        torch.linalg.det(linear).abs(), torch.ones(4000, dtype=torch.float64)
    )
    # offset = -L t with L orthogonal, so |offset| per axis bounds |t| only jointly:
    # |t| <= sqrt(2) * 2 * 0.125.
    assert offset.norm(dim=1).max() <= 2 * 0.125 * 2**0.5 + 1e-9
    one_flip = (linear[:, 0, 0] * linear[:, 1, 1] - linear[:, 0, 1] * linear[:, 1, 0]) < 0
    assert 0.45 < one_flip.double().mean() < 0.55  # exactly one flip: det -1, p = 0.5


def test_outside_fills_with_background() -> None:
    x = torch.full((2, 3, 16, 16), 0.2)
    far = AugmentParams(rotation_deg=(45.0, 45.0), flip_p=0.0, max_shift=0.0)
    out = augment(x, seeded_generator(0), far, fill=(0.9, 0.8, 0.7))
    # The corners of a 45-degree turn read from outside the crop.
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.9, 0.8, 0.7]))
    torch.testing.assert_close(out[0, :, 8, 8], torch.tensor([0.2, 0.2, 0.2]))


def test_misuse_is_rejected() -> None:
    with pytest.raises(ValueError, match="shape"):
        augment(torch.zeros(3, 8, 8), seeded_generator(0))
    with pytest.raises(ValueError, match="fill"):
        augment(torch.zeros(1, 3, 8, 8), seeded_generator(0), fill=(1.0, 2.0))
    with pytest.raises(ValueError, match="flip_p"):
        AugmentParams(flip_p=2.0)
