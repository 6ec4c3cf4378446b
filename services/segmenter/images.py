"""Uploaded bytes -> a checked RGB field, and the metadata-free PNG that is stored.

The checks and their limits are the shared decoder's (:mod:`bmcell.images`); here the
uploaded bytes are the ``chunk`` field and their cap is the stream's,
``BMCELL_MAX_UPLOAD_BYTES``. What is stored is the pixels re-encoded as PNG, so no
metadata of the upload (EXIF, text chunks, ICC profile) is kept.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from bmcell import images
from bmcell.images import png_bytes

__all__ = ["FieldImage", "decode", "decode_pixels", "png_bytes", "read_png"]


@dataclass(frozen=True)
class FieldImage:
    rgb: np.ndarray  # (h, w, 3) uint8
    format: str  # PNG, JPEG or TIFF: what was uploaded
    png: bytes  # the pixels re-encoded as PNG: no EXIF, no text chunks, no ICC profile

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


def decode(data: bytes, *, max_bytes: int, max_pixels: int, max_frames: int = 1) -> FieldImage:
    decoded = decode_pixels(data, max_bytes=max_bytes, max_pixels=max_pixels, max_frames=max_frames)
    return FieldImage(decoded.rgb, decoded.format, png_bytes(decoded.rgb, fast=True))


def decode_pixels(
    data: bytes, *, max_bytes: int, max_pixels: int, max_frames: int = 1
) -> images.Decoded:
    """The checked pixels and format, without the PNG (a segmentation worker writes it)."""
    limits = images.Limits(max_bytes, max_pixels, max_frames, "BMCELL_MAX_UPLOAD_BYTES")
    return images.decode_rgb(data, limits, field="chunk")


def read_png(data: bytes) -> np.ndarray:
    """A PNG that :func:`png_bytes` wrote (a stored field, crop or mask), as its array."""
    with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
        return np.asarray(img)
