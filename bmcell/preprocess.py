"""Turn a stored cell crop into the network's input tensor, the one way everyone does it.

The classifier service (before sending to Triton), the trainer and any in-process
PyTorch evaluation must feed the network identical numbers for the same crop, or
the probabilities Triton returns drift from the ones the model was validated with.
So the decode, colour conversion, resize filter and scaling live here only, and
``preprocessing_spec`` records them beside every exported model version.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from bmcell import images
from bmcell.errors import InvalidArgument

#: Resize filter used for every crop. Fixed (not a parameter) so that training and
#: serving cannot disagree; PIL's bilinear filter antialiases when downscaling.
RESAMPLE = Image.Resampling.BILINEAR
CHANNEL_ORDER = "RGB"
#: Share of the crop's side kept around its centre before resizing. The segmenter
#: centres each cell in a 282 px crop with room for the largest (promyelocytes,
#: proerythroblasts); most cells are far smaller, so the centre 192 px hold every
#: cell while giving the network 1.5x more pixels per cell at the same input size.
CENTRE_FRACTION = 192 / 282
LAYOUT = "CHW"
SCALE = 1.0 / 255.0

CropInput = bytes | bytearray | memoryview | np.ndarray | Image.Image
#: Caps for crop bytes decoded here (stored crops are 282x282; a client's crops are
#: checked against the classifier's own, smaller settings before they get here).
CROP_LIMITS = images.Limits(max_bytes=32 * 1024 * 1024, max_pixels=16_000_000)


def preprocessing_spec(input_size: int) -> dict[str, Any]:
    """What ``crop_to_tensor`` does, as data: written as ``preprocessing.json`` per version."""
    _check_size(input_size)
    return {
        "input_size": input_size,
        "layout": LAYOUT,
        "channel_order": CHANNEL_ORDER,
        "dtype": "float32",
        "scaling": "pixel / 255 (uint8 -> [0, 1]); no mean/std normalisation",
        "centre_fraction": CENTRE_FRACTION,
        "resize": {"library": "Pillow", "filter": RESAMPLE.name, "from": "centre of square crop"},
    }


def _check_size(input_size: int) -> None:
    if not isinstance(input_size, int) or isinstance(input_size, bool):
        raise TypeError(f"input_size must be an int, got {input_size!r}")
    if input_size < 16 or input_size % 16:
        raise ValueError(
            f"input_size must be a positive multiple of 16 (four 2x poolings), got {input_size}"
        )


def _to_image(crop: CropInput) -> Image.Image:
    if isinstance(crop, Image.Image):
        return crop
    if isinstance(crop, bytes | bytearray | memoryview):
        try:
            decoded = images.decode_rgb(bytes(crop), CROP_LIMITS, field="crop")
        except InvalidArgument as exc:
            raise ValueError(
                f"crop bytes ({len(crop)} bytes) are not a decodable image: {exc.message}"
            ) from exc
        return Image.fromarray(decoded.rgb)
    if isinstance(crop, np.ndarray):
        if crop.dtype != np.uint8:
            raise ValueError(
                f"crop array must be uint8 (H, W, 3|4) or (H, W), got dtype {crop.dtype}"
            )
        if crop.ndim == 2 or (crop.ndim == 3 and crop.shape[2] in (3, 4)):
            return Image.fromarray(crop)
        raise ValueError(f"crop array must have shape (H, W, 3|4) or (H, W), got {crop.shape}")
    raise TypeError(
        f"crop must be image bytes, a uint8 array or a PIL image, got {type(crop).__name__}"
    )


def crop_to_uint8(crop: CropInput, input_size: int) -> np.ndarray:
    """A square crop at the network's input size, uint8 (S, S, 3) RGB: what
    :func:`crop_to_tensor` scales, and what ``bmcell.thumbs`` stores per cell.

    Alpha is dropped (the segmenter already blanked the extracellular area) and
    greyscale is expanded to RGB; the centre ``CENTRE_FRACTION`` of the crop is kept.
    Non-square crops are refused rather than distorted: crops come from the segmenter
    square, so another shape is a bug.
    """
    _check_size(input_size)
    image = _to_image(crop)
    if image.width != image.height:
        raise ValueError(f"crop must be square, got {image.width}x{image.height}")
    if image.mode != CHANNEL_ORDER:
        image = image.convert(CHANNEL_ORDER)
    keep = round(image.width * CENTRE_FRACTION)
    if keep < image.width:
        offset = (image.width - keep) // 2
        image = image.crop((offset, offset, offset + keep, offset + keep))
    if image.width != input_size:
        image = image.resize((input_size, input_size), resample=RESAMPLE)
    return np.asarray(image, dtype=np.uint8)  # (S, S, 3)


def uint8_to_batch(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S, 3) or (S, S, 3) to float32 (N, 3, S, S) or (3, S, S) in [0, 1]."""
    if pixels.dtype != np.uint8 or pixels.ndim not in (3, 4) or pixels.shape[-1] != 3:
        raise ValueError(
            f"pixels must be uint8 (N, S, S, 3) or (S, S, 3), got {pixels.dtype} {pixels.shape}"
        )
    axes = (2, 0, 1) if pixels.ndim == 3 else (0, 3, 1, 2)
    return np.ascontiguousarray(pixels.transpose(axes), dtype=np.float32) * np.float32(SCALE)


def crop_to_tensor(crop: CropInput, input_size: int) -> np.ndarray:
    """Decode a square crop (PNG bytes, uint8 array or PIL image) to float32 (3, S, S) in [0, 1].

    The same numbers as :func:`crop_to_uint8` then :func:`uint8_to_batch`.
    """
    return uint8_to_batch(crop_to_uint8(crop, input_size))


def batch_from_crops(crops: Sequence[CropInput], input_size: int) -> np.ndarray:
    """Stack crops into one float32 batch (N, 3, S, S), the shape Triton's ``INPUT`` takes."""
    if len(crops) == 0:
        raise ValueError("batch_from_crops needs at least one crop, got an empty sequence")
    out = np.empty((len(crops), 3, input_size, input_size), dtype=np.float32)
    for i, crop in enumerate(crops):
        try:
            out[i] = crop_to_tensor(crop, input_size)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"crop {i}: {exc}") from exc
    return out
