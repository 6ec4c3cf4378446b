"""The one way bmcell turns bytes from outside into pixels: bounded, and refused precisely.

Every path that decodes a client's image (the segmenter's Upload, Classify with raw
crops) comes through :func:`decode_rgb`. Checks run cheapest first, each refusal an
:class:`~bmcell.errors.InvalidArgument` naming the limit and its setting:

1. size in bytes (``BMCELL_MAX_IMAGE_BYTES``), before Pillow sees a byte;
2. the format from the magic bytes: PNG, JPEG or TIFF only, so Pillow's dozens of
   other parsers are never reached;
3. the pixel dimensions from the header, *before* any pixel is decoded
   (``BMCELL_MAX_IMAGE_PIXELS``): a decompression bomb is refused without being
   inflated. The cap is checked per call, not by changing Pillow's process-wide
   ``Image.MAX_IMAGE_PIXELS`` (which stays at its default as a second line);
4. the frame count, by seeking one past the limit (``BMCELL_MAX_IMAGE_FRAMES``), so a
   TIFF with a million IFDs costs at most ``limit + 1`` IFD reads;
5. the mode against a whitelist, converting the rest to 8-bit RGB: 16-bit greyscale
   is scaled (not clipped), palette, CMYK, YCbCr, LA and RGBA are converted, alpha is
   dropped; float and other exotic modes are refused;
6. the full decode: a truncated or corrupt file fails here. Pillow raises many types
   for bytes it cannot parse; every one of them means "not a decodable image".
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from bmcell.errors import InvalidArgument

_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}
#: Modes converted to RGB by Pillow's own conversion.
_CONVERTIBLE = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"}
#: Modes with more than 8 bits per sample: scaled to 8 bits first.
_WIDE = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


@dataclass(frozen=True)
class Limits:
    """Caps for one decode; ``bytes_setting`` names the variable a refusal cites."""

    max_bytes: int
    max_pixels: int
    max_frames: int = 1
    bytes_setting: str = "BMCELL_MAX_IMAGE_BYTES"
    pixels_setting: str = "BMCELL_MAX_IMAGE_PIXELS"

    @classmethod
    def of(cls, settings: Any) -> Limits:
        """The caps a service's settings give (``max_image_bytes``, ``_pixels``, ``_frames``)."""
        return cls(settings.max_image_bytes, settings.max_image_pixels, settings.max_image_frames)


@dataclass(frozen=True)
class Decoded:
    rgb: np.ndarray  # (h, w, 3) uint8
    format: str  # PNG, JPEG or TIFF: what was sent

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


def sniff(data: bytes, *, field: str = "image") -> str:
    for magic, fmt in _MAGIC.items():
        if data.startswith(magic):
            return fmt
    raise InvalidArgument("unsupported format: only PNG, JPEG and TIFF are accepted", field=field)


def decode_rgb(data: bytes, limits: Limits, *, field: str = "image") -> Decoded:
    """``data`` as an 8-bit RGB array, or InvalidArgument naming what is wrong."""
    if not data:
        raise InvalidArgument("empty image: no bytes", field=field)
    if len(data) > limits.max_bytes:
        raise InvalidArgument(
            f"too large: {len(data)} bytes, the limit is {limits.max_bytes} "
            f"({limits.bytes_setting})",
            field=field,
        )
    fmt = sniff(data, field=field)
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as exc:
        raise _too_many_pixels(None, limits, field) from exc
    except MemoryError:  # never "a bad image": the caps above exist so this cannot happen
        raise
    except Exception as exc:  # Pillow's parsers raise many types on hostile bytes
        raise InvalidArgument(f"corrupt {fmt} header ({type(exc).__name__})", field=field) from exc
    try:
        return Decoded(_pixels(img, fmt, limits, field), fmt)
    finally:
        img.close()


def _pixels(img: Image.Image, fmt: str, limits: Limits, field: str) -> np.ndarray:
    width, height = img.size
    if width < 1 or height < 1:
        raise InvalidArgument(f"pixel dimensions {width}x{height} are empty", field=field)
    if width * height > limits.max_pixels:
        raise _too_many_pixels((width, height), limits, field)
    _check_frames(img, fmt, limits, field)
    if img.mode not in _CONVERTIBLE and img.mode not in _WIDE:
        raise InvalidArgument(
            f"pixel mode {img.mode} is not supported: 1/8/16-bit greyscale, palette, RGB, "
            "RGBA, CMYK or YCbCr",
            field=field,
        )
    try:
        img.load()
        if img.size != (width, height):  # a decoder may only now learn the real size
            raise InvalidArgument("the decoded size differs from the header's", field=field)
        if img.mode in _WIDE:
            wide = np.asarray(img, dtype=np.int64)
            grey = (np.clip(wide, 0, 65535) // 257).astype(np.uint8)
            return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (InvalidArgument, MemoryError):
        raise
    except Image.DecompressionBombError as exc:
        raise _too_many_pixels(None, limits, field) from exc
    except Exception as exc:  # truncated data, bad tiles, corrupt compressed streams
        raise InvalidArgument(
            f"truncated or corrupt {fmt} image ({type(exc).__name__})", field=field
        ) from exc
    if rgb.shape != (height, width, 3):
        raise InvalidArgument(
            f"decoded to shape {rgb.shape}, not {height}x{width} RGB", field=field
        )
    return rgb


def _check_frames(img: Image.Image, fmt: str, limits: Limits, field: str) -> None:
    """Refuse more than ``max_frames`` frames, reading at most that many + 1."""
    if fmt != "TIFF":  # PNG (APNG) and JPEG (MPO) frames beyond the first are ignored
        return
    try:
        img.seek(limits.max_frames)
    except EOFError:
        pass  # fewer frames than the limit + 1: what was wanted
    except MemoryError:
        raise
    except Exception as exc:
        raise InvalidArgument(
            f"corrupt TIFF directory ({type(exc).__name__})", field=field
        ) from exc
    else:
        raise InvalidArgument(
            f"more than {limits.max_frames} frame(s) (pages): the limit is "
            f"{limits.max_frames} (BMCELL_MAX_IMAGE_FRAMES)",
            field=field,
        )
    try:
        img.seek(0)
    except Exception as exc:
        raise InvalidArgument(
            f"corrupt TIFF directory ({type(exc).__name__})", field=field
        ) from exc
    if img.size[0] * img.size[1] > limits.max_pixels:
        raise _too_many_pixels(img.size, limits, field)


def _too_many_pixels(size: tuple[int, int] | None, limits: Limits, field: str) -> InvalidArgument:
    dims = f"pixel dimensions {size[0]}x{size[1]}" if size else "pixel dimensions"
    return InvalidArgument(
        f"{dims} are beyond the limit of {limits.max_pixels} pixels ({limits.pixels_setting})",
        field=field,
    )


def png_bytes(array: np.ndarray, *, fast: bool = False) -> bytes:
    """Pixels as a PNG with no metadata: no EXIF, no text chunks, no ICC profile.

    Crops and masks are stored under the digest of these bytes, so their encoding
    never changes; ``fast`` (zlib level 1: ~1.5x faster, ~2% larger) is for images
    stored under another digest, like a field under its upload's."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1 if fast else 3)
    return buf.getvalue()
