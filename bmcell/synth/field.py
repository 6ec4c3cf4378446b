"""Compose a microscope field: red cells, nucleated cells with controlled overlap,
then the lab's stain and scanner.

Every nucleated cell is drawn with its own generator, seeded from the field's, and
the seed is kept in ``CellInfo`` so a test can redraw any cell alone and compare
it with the field's masks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from bmcell.synth.geometry import Grid
from bmcell.synth.morphology import PX_PER_UM, RBC_DIAMETER_UM, normalise_mix
from bmcell.synth.render import CellPatch, render_cell
from bmcell.synth.stain import LabStyle, to_rgb

CELLS_PER_MPX = 24.0  # nucleated cells per million pixels: about 12 in a 704x704 field
CROP_FILL = (255, 255, 255)


@dataclass(frozen=True)
class CellInfo:
    id: int
    code: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 of the visible mask; x1, y1 exclusive
    touches_border: bool
    centre: tuple[int, int]  # x, y of the drawn patch centre
    seed: int  # render_cell(np.random.default_rng(seed), code) redraws this cell


@dataclass(frozen=True)
class FieldSample:
    image: np.ndarray  # (h, w, 3) uint8
    instances: np.ndarray  # (h, w) int32, 0 background, k = cell id
    nuclei: np.ndarray  # (h, w) int32, cell id where that cell's nucleus is visible
    cells: list[CellInfo]


def patch_slices(
    cx: int, cy: int, half: int, size: int
) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """Field and patch slices for a patch centred at (cx, cy), clipped to the field."""
    x0, y0, x1, y1 = cx - half, cy - half, cx + half + 1, cy + half + 1
    fx0, fy0, fx1, fy1 = max(x0, 0), max(y0, 0), min(x1, size), min(y1, size)
    if fx0 >= fx1 or fy0 >= fy1:
        return None
    field = (slice(fy0, fy1), slice(fx0, fx1))
    patch = (slice(fy0 - y0, fy1 - y0), slice(fx0 - x0, fx1 - x0))
    return field, patch


def _red_cells(rng: np.random.Generator, dyes: np.ndarray, density: float) -> None:
    """Add red cells: discs thicker at the rim than the pale centre (biconcave)."""
    size = dyes.shape[0]
    count = int(rng.poisson(density * size * size / 1e4))
    for _ in range(count):
        r = rng.uniform(*RBC_DIAMETER_UM) * PX_PER_UM / 2
        half = int(np.ceil(r)) + 2
        grid = Grid.square(half)
        dist = np.hypot(grid.x * rng.uniform(0.92, 1.0), grid.y)
        alpha = np.clip(r + 0.5 - dist, 0.0, 1.0)
        profile = 0.55 + 0.45 * np.clip(dist / r, 0.0, 1.0) ** 2
        dens = alpha * profile * rng.uniform(0.5, 0.75)
        cx, cy = (int(v) for v in rng.integers(-half, size + half, 2))
        slices = patch_slices(cx, cy, half, size)
        if slices is None:
            continue
        fs, ps = slices
        dyes[fs + (1,)] += dens[ps]
        dyes[fs + (0,)] += 0.04 * dens[ps]


def _place(
    rng: np.random.Generator,
    size: int,
    radius: float,
    placed: list[tuple[int, int, float]],
    max_overlap: float,
) -> tuple[int, int] | None:
    """A centre whose overlap with every placed cell stays under ``max_overlap``."""
    for _ in range(40):
        cx, cy = (int(v) for v in rng.uniform(-0.3 * radius, size + 0.3 * radius, 2))
        if all(
            np.hypot(cx - x, cy - y) >= (radius + r) * (1.0 - max_overlap) for x, y, r in placed
        ):
            return cx, cy
    return None


def _stamp(
    patch: CellPatch,
    cid: int,
    cx: int,
    cy: int,
    dyes: np.ndarray,
    instances: np.ndarray,
    nuclei: np.ndarray,
) -> None:
    slices = patch_slices(cx, cy, patch.half, dyes.shape[0])
    if slices is None:
        return
    fs, ps = slices
    dyes[fs] += patch.dyes[ps]
    cell, nuc = patch.cell[ps], patch.nucleus[ps]
    # A later cell lies on top: it owns the pixels and hides nuclei below it.
    instances[fs][cell] = cid
    nuclei[fs][cell] = 0
    nuclei[fs][nuc] = cid


def render_field(
    rng: np.random.Generator, lab: LabStyle, class_mix: Mapping[str, float], size: int = 704
) -> FieldSample:
    """One field image with its instance and nucleus masks and per-cell records."""
    codes, probs = normalise_mix(class_mix)
    dyes = np.zeros((size, size, 2), dtype=np.float32)
    _red_cells(rng, dyes, lab.rbc_density)
    instances = np.zeros((size, size), dtype=np.int32)
    nuclei = np.zeros((size, size), dtype=np.int32)
    count = max(1, int(rng.poisson(CELLS_PER_MPX * size * size / 1e6)))
    placed: list[tuple[int, int, float]] = []
    drawn: list[tuple[int, str, int, int, int]] = []
    for code in rng.choice(codes, size=count, p=probs):
        seed = int(rng.integers(0, 2**63))
        patch = render_cell(np.random.default_rng(seed), str(code))
        at = _place(rng, size, patch.radius, placed, lab.max_overlap)
        if at is None:
            continue
        cid = len(drawn) + 1
        _stamp(patch, cid, at[0], at[1], dyes, instances, nuclei)
        placed.append((at[0], at[1], patch.radius))
        drawn.append((cid, str(code), at[0], at[1], seed))
    image = to_rgb(dyes, lab, rng)
    cells = []
    boxes = ndimage.find_objects(instances, max_label=len(drawn))
    for (cid, code, cx, cy, seed), box in zip(drawn, boxes, strict=True):
        if box is None:
            continue  # wholly hidden (cannot happen with max_overlap < 1, kept safe)
        ys, xs = box
        bbox = (xs.start, ys.start, xs.stop, ys.stop)
        touches = xs.start == 0 or ys.start == 0 or xs.stop == size or ys.stop == size
        cells.append(CellInfo(cid, code, bbox, bool(touches), (cx, cy), seed))
    return FieldSample(image, instances, nuclei, cells)


def render_crop(
    rng: np.random.Generator,
    lab: LabStyle,
    class_code: str,
    size: int = 282,
    fill: tuple[int, int, int] = CROP_FILL,
) -> tuple[np.ndarray, np.ndarray]:
    """A single-cell crop as a segmenter cuts it: the cell centred over its red-cell
    background, photographed by the lab, everything outside the cell set to ``fill``.
    """
    dyes = np.zeros((size, size, 2), dtype=np.float32)
    _red_cells(rng, dyes, lab.rbc_density)
    instances = np.zeros((size, size), dtype=np.int32)
    nuclei = np.zeros((size, size), dtype=np.int32)
    patch = render_cell(np.random.default_rng(int(rng.integers(0, 2**63))), class_code)
    cx, cy = (size // 2 + int(v) for v in rng.integers(-4, 5, 2))
    _stamp(patch, 1, cx, cy, dyes, instances, nuclei)
    image = to_rgb(dyes, lab, rng)
    mask = instances == 1
    image[~mask] = np.asarray(fill, dtype=np.uint8)
    return image, mask
