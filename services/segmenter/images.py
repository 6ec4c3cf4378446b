"""Uploaded bytes -> a checked RGB field, and the metadata-free PNG that is stored.

Checks run cheapest first, each refusal naming the problem: size, then the format
from the file's magic bytes (PNG, JPEG, TIFF only), then the pixel dimensions from
the header *before* any pixel is decoded (so a decompression bomb is refused
without being inflated), then the full decode (truncated or corrupt files fail
here). PIL's own bomb guard is set from the same limit as a second line.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from bmcell.errors import InvalidArgument

_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


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


def set_pixel_limit(max_pixels: int) -> None:
    """PIL refuses images above this many pixels (process-wide, set at start)."""
    Image.MAX_IMAGE_PIXELS = max_pixels


def sniff(data: bytes) -> str:
    for magic, fmt in _MAGIC.items():
        if data.startswith(magic):
            return fmt
    raise InvalidArgument(
        "unsupported format: only PNG, JPEG and TIFF field images are accepted",
        field="chunk",
    )


def decode(data: bytes, *, max_bytes: int, max_pixels: int) -> FieldImage:
    if not data:
        raise InvalidArgument("empty upload: no bytes after the header", field="chunk")
    if len(data) > max_bytes:
        raise InvalidArgument(
            f"too large: {len(data)} bytes, the limit is {max_bytes}", field="chunk"
        )
    fmt = sniff(data)
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as exc:
        raise InvalidArgument(
            f"pixel dimensions are beyond the limit of {max_pixels} pixels: {exc}", field="chunk"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidArgument(f"corrupt {fmt} header: {exc}", field="chunk") from exc
    width, height = img.size
    if width < 1 or height < 1 or width * height > max_pixels:
        raise InvalidArgument(
            f"pixel dimensions {width}x{height} are beyond the limit of {max_pixels} pixels",
            field="chunk",
        )
    try:
        img.load()
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidArgument(f"truncated or corrupt {fmt} image: {exc}", field="chunk") from exc
    return FieldImage(rgb, fmt, png_bytes(rgb))


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def read_png(data: bytes) -> np.ndarray:
    """A PNG that :func:`png_bytes` wrote (a stored field, crop or mask), as its array."""
    with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
        return np.asarray(img)
