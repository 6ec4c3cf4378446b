"""The field around a cell, for the reviewer: a window of the field image with the
cell's bounding box drawn, so size and colour can be judged against the neighbours.

The window keeps the field's own resolution (no resampling: what the reviewer sees is
what the segmenter cut the crop from) and is clipped to the field, so a cell near an
edge is off-centre rather than padded with invented pixels.
"""

from __future__ import annotations

import numpy as np

from bmcell import images

# Stored fields passed the segmenter's checks at upload; these caps are the largest
# the segmenter's settings allow, so any field it took can be shown.
FIELD_LIMITS = images.Limits(max_bytes=1 << 30, max_pixels=89_000_000, max_frames=64)
# Drawn just outside the box so the cell's own edge stays visible: a dark ring inside a
# bright one reads on pale and on dense backgrounds alike.
_RING = ((3, (255, 220, 0)), (4, (0, 0, 0)))


def window(
    bbox: tuple[int, int, int, int], size: int, width: int, height: int
) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a ``size`` square centred on ``bbox``, moved inside the field
    and cut to it where the field is smaller."""
    cx, cy = (bbox[0] + bbox[2]) // 2, (bbox[1] + bbox[3]) // 2
    w, h = min(size, width), min(size, height)
    x0 = min(max(cx - w // 2, 0), width - w)
    y0 = min(max(cy - h // 2, 0), height - h)
    return x0, y0, x0 + w, y0 + h


def outline(rgb: np.ndarray, bbox: tuple[int, int, int, int]) -> None:
    """Draw the box's rings on ``rgb`` in place (clipped to the image)."""
    h, w = rgb.shape[:2]
    for gap, colour in _RING:
        x0, y0 = max(bbox[0] - gap, 0), max(bbox[1] - gap, 0)
        x1, y1 = min(bbox[2] + gap, w) - 1, min(bbox[3] + gap, h) - 1
        if x1 < x0 or y1 < y0:
            continue
        rgb[y0, x0 : x1 + 1] = colour
        rgb[y1, x0 : x1 + 1] = colour
        rgb[y0 : y1 + 1, x0] = colour
        rgb[y0 : y1 + 1, x1] = colour


def render(
    data: bytes, bbox: tuple[int, int, int, int], size: int
) -> tuple[bytes, tuple[int, int, int, int]]:
    """The PNG of the window around ``bbox`` in the field image ``data``, and the window."""
    field = images.decode_rgb(data, FIELD_LIMITS, field="field").rgb
    win = window(bbox, size, field.shape[1], field.shape[0])
    part = field[win[1] : win[3], win[0] : win[2]].copy()  # decoded arrays may be read-only
    outline(part, (bbox[0] - win[0], bbox[1] - win[1], bbox[2] - win[0], bbox[3] - win[1]))
    return images.png_bytes(part), win
