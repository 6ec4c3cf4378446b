"""Draw one nucleated cell (or bare nucleus, or artifact) on a local patch.

A cell is drawn as dye density, not colour: two channels, (azure, eosin), which
the lab's stain turns into RGB by Beer-Lambert absorption. Densities add where
cells overlap, as light passing through two layers does, and stain differences
between labs stay a separate, later step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from bmcell.synth.geometry import (
    Grid,
    disc_sdf,
    ellipse_sdf,
    segments_sdf,
    smooth_noise,
    tube_sdf,
)
from bmcell.synth.morphology import GRANULES, MORPHOLOGY, PX_PER_UM, Morphology
from bmcell.synth.nucleus import nucleus_tube


@dataclass(frozen=True)
class CellPatch:
    """A drawn cell: dye densities (h, w, 2) and its masks, centred on the patch."""

    dyes: np.ndarray
    cell: np.ndarray
    nucleus: np.ndarray
    radius: float  # footprint radius used for placement and overlap control

    @property
    def half(self) -> int:
        return self.cell.shape[0] // 2


def _alpha(sdf: np.ndarray) -> np.ndarray:
    """One-pixel anti-aliased coverage; >= 0.5 exactly where the mask is set."""
    return np.clip(0.5 - sdf, 0.0, 1.0)


def _jitter(rng: np.random.Generator, dye: tuple[float, float], amount: float) -> np.ndarray:
    scale = rng.uniform(1 - amount, 1 + amount, 2)
    return (np.asarray(dye, dtype=np.float32) * scale).astype(np.float32)


def _sample_pixels(
    rng: np.random.Generator, region: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.nonzero(region)
    if count <= 0 or ys.size == 0:
        return ys[:0], xs[:0]
    pick = rng.integers(0, ys.size, count)
    return ys[pick], xs[pick]


def _granules(
    rng: np.random.Generator, kind: str, count: int, region: np.ndarray, px_per_um: float
) -> np.ndarray:
    """Dye density (h, w, 2) of ``count`` granules scattered over ``region``."""
    g = GRANULES[kind]
    sigma = max(g.sigma_um * px_per_um, 0.5)
    impulses = np.zeros(region.shape, dtype=np.float32)
    ys, xs = _sample_pixels(rng, region, count)
    np.add.at(impulses, (ys, xs), rng.uniform(0.6, 1.4, ys.size).astype(np.float32))
    # A blurred unit impulse peaks at 1/(2 pi sigma^2); rescale so a granule's core has
    # the table's density whatever its size.
    blobs = ndimage.gaussian_filter(impulses, sigma) * (2 * np.pi * sigma**2)
    return blobs[..., None] * np.asarray(g.dye, dtype=np.float32)


def _chromatin(rng: np.random.Generator, shape: tuple[int, int], coarse: float) -> np.ndarray:
    """Density multiplier: fine, even chromatin at 0; dark clumps and pale gaps at 1."""
    fine = smooth_noise(rng, shape, 0.8)
    clumps = smooth_noise(rng, shape, 1.0 + 1.6 * coarse)
    tex = 1.0 + 0.12 * fine + (0.1 + 0.55 * coarse) * np.tanh(1.5 * clumps)
    return np.clip(tex, 0.25, None)


def _chromosomes(
    rng: np.random.Generator, grid: Grid, radius: float, px_per_um: float
) -> np.ndarray:
    """Signed distance of a metaphase plate or two anaphase groups of short rods."""
    n = int(rng.integers(24, 44))
    axis = rng.uniform(0, np.pi)
    along = np.array([np.cos(axis), np.sin(axis)], dtype=np.float32)
    across = np.array([-along[1], along[0]], dtype=np.float32)
    s = rng.uniform(-0.45, 0.45, n) * radius
    if rng.random() < 0.6:
        t = rng.normal(0.0, 0.8 * px_per_um, n)
    else:
        t = (
            np.where(rng.random(n) < 0.5, -1.0, 1.0) * 0.3 * radius
            + rng.normal(0, 0.6, n) * px_per_um
        )
    centres = s[:, None] * along + t[:, None] * across
    theta = axis + np.pi / 2 + rng.normal(0.0, 0.6, n)
    half_len = rng.uniform(0.4, 1.1, n) * px_per_um
    d = np.stack([np.cos(theta), np.sin(theta)], axis=1) * half_len[:, None]
    r = np.full(n, 0.32 * px_per_um, dtype=np.float32)
    return segments_sdf(
        grid, (centres - d).astype(np.float32), (centres + d).astype(np.float32), r, r
    )


def render_cell(rng: np.random.Generator, code: str, px_per_um: float = PX_PER_UM) -> CellPatch:
    """Draw one cell of class ``code`` with its own random generator."""
    try:
        m = MORPHOLOGY[code]
    except KeyError:
        raise KeyError(f"no synthetic morphology for class {code!r}") from None
    if m.nucleus == "artifact":
        return _artifact(rng, m, px_per_um)
    radius = float(rng.uniform(*m.diameter_um)) * px_per_um / 2
    half = int(np.ceil(radius * 1.12)) + 4
    grid = Grid.square(half)
    shape = grid.shape

    body = ellipse_sdf(grid, radius, rng.uniform(1.0, 1.15), rng.uniform(0, 2 * np.pi))
    body = body + smooth_noise(rng, shape, radius / 3) * (0.03 * radius)
    if m.nucleus == "mitotic":
        nuc_sdf = _chromosomes(rng, grid, radius, px_per_um)
        nuc_centre = np.zeros(2, dtype=np.float32)
    else:
        margin = 0.0 if m.nucleus == "bare" else 0.5 * px_per_um
        tube = nucleus_tube(rng, m, radius, margin)
        rough = 1.6 if m.nucleus in ("bare", "kidney") else 0.5
        nuc_sdf = tube_sdf(grid, tube) + smooth_noise(rng, shape, 2.5) * rough
        nuc_centre = tube.points.mean(axis=0)
    if m.nucleus == "bare":
        body = nuc_sdf
    cell_a = _alpha(body)
    nuc_a = _alpha(nuc_sdf) * (body <= 0)

    # Cytoplasm: thinner at the rim, mottled, with per-cell staining jitter.
    thickness = 0.65 + 0.35 * np.clip(-body / (0.3 * radius), 0.0, 1.0)
    cyto = cell_a * thickness * (1.0 + 0.1 * smooth_noise(rng, shape, 3.0))
    if m.halo:
        # Pale Golgi zone against the nucleus, on the side facing the cell's centre.
        to_centre = -nuc_centre / (np.hypot(*nuc_centre) + 1e-3)
        side = (grid.x - nuc_centre[0]) * to_centre[0] + (grid.y - nuc_centre[1]) * to_centre[1]
        side = np.clip(0.5 + side / (radius * 0.6), 0.0, 1.0)
        zone = np.exp(-np.clip(nuc_sdf, 0.0, None) / (0.12 * radius)) * (nuc_sdf > 0)
        cyto = cyto * (1.0 - 0.7 * zone * side)
    n_vac = int(rng.integers(m.vacuoles[0], m.vacuoles[1] + 1))
    for vy, vx in zip(*_sample_pixels(rng, (body < -4) & (nuc_sdf > 3), n_vac), strict=True):
        r = rng.uniform(0.4, 1.0) * px_per_um
        cyto = cyto * np.where(disc_sdf(grid, vx - half, vy - half, r) < 0, 0.3, 1.0)
    dyes = cyto[..., None] * _jitter(rng, m.cytoplasm, 0.15)

    tex = _chromatin(rng, shape, float(rng.uniform(*m.chromatin)))
    tex = tex + 0.15 * np.exp(np.clip(nuc_sdf, None, 0.0) / 1.5)  # nuclear membrane rim
    n_nucleoli = int(rng.integers(m.nucleoli[0], m.nucleoli[1] + 1))
    for ny, nx in zip(*_sample_pixels(rng, nuc_sdf < -1.4 * px_per_um, n_nucleoli), strict=True):
        r = rng.uniform(0.6, 1.1) * px_per_um
        tex = tex * np.where(disc_sdf(grid, nx - half, ny - half, r) < 0, 0.5, 1.0)
    nucleus = (nuc_a * tex)[..., None] * _jitter(rng, m.chromatin_dye, 0.1)
    dyes = dyes * (1.0 - 0.8 * nuc_a[..., None]) + nucleus

    cell_mask = body <= 0
    nuc_mask = (nuc_sdf <= 0) & cell_mask
    if m.granules is not None:
        region = cell_mask if GRANULES[m.granules].over_nucleus else cell_mask & ~nuc_mask
        count = int(rng.integers(m.granule_count[0], m.granule_count[1] + 1))
        dyes = dyes + _granules(rng, m.granules, count, region & (body < -1), px_per_um)
    return CellPatch(dyes.astype(np.float32), cell_mask, nuc_mask, radius)


def _artifact(rng: np.random.Generator, m: Morphology, px_per_um: float) -> CellPatch:
    """A smudge cell, a cluster of debris, or a broken cell spilling granules."""
    radius = float(rng.uniform(*m.diameter_um)) * px_per_um / 2
    half = int(np.ceil(radius * 1.3)) + 4
    grid = Grid.square(half)
    shape = grid.shape
    kind = rng.choice(["smudge", "debris", "broken"], p=[0.45, 0.25, 0.3])
    if kind == "smudge":
        body = ellipse_sdf(grid, radius, rng.uniform(1.0, 1.8), rng.uniform(0, 2 * np.pi))
        body = body + smooth_noise(rng, shape, radius / 4) * (0.12 * radius)
        mask = body <= 0
        streaks = np.clip(1.0 + 0.5 * smooth_noise(rng, shape, 3.0), 0.2, None)
        dens = _alpha(body) * streaks * rng.uniform(0.3, 0.6)
        dyes = dens[..., None] * np.array([0.9, 0.75], dtype=np.float32)
        return CellPatch(dyes.astype(np.float32), mask, mask.copy(), radius)
    if kind == "debris":
        n = int(rng.integers(3, 9))
        r = rng.uniform(0.6, 2.2, n) * px_per_um
        ang = rng.uniform(0, 2 * np.pi, n)
        dist = rng.uniform(0, 0.6, n) * radius
        centres = np.stack([dist * np.cos(ang), dist * np.sin(ang)], axis=1).astype(np.float32)
        body = segments_sdf(grid, centres, centres, r.astype(np.float32), r.astype(np.float32))
        body = body + smooth_noise(rng, shape, 1.5) * 0.8
        mask = body <= 0
        dye = np.array([rng.uniform(0.2, 1.2), rng.uniform(0.3, 0.9)], dtype=np.float32)
        dyes = _alpha(body)[..., None] * dye
        return CellPatch(dyes.astype(np.float32), mask, np.zeros_like(mask), radius)
    body = ellipse_sdf(grid, radius, rng.uniform(1.0, 1.2), rng.uniform(0, 2 * np.pi))
    cut = rng.uniform(0, 2 * np.pi)
    plane = grid.x * np.cos(cut) + grid.y * np.sin(cut) - rng.uniform(-0.3, 0.4) * radius
    body = np.maximum(body, plane + smooth_noise(rng, shape, 2.0) * 3.0)
    mask = body <= 0
    nuc_sdf = disc_sdf(grid, *rng.normal(0, 0.2 * radius, 2), rng.uniform(0.2, 0.4) * radius)
    nuc_sdf = nuc_sdf + smooth_noise(rng, shape, 2.0) * 1.5
    nuc_a = _alpha(nuc_sdf) * mask
    dyes = _alpha(body)[..., None] * _jitter(rng, (0.3, 0.35), 0.3)
    dyes = dyes + nuc_a[..., None] * np.array([0.8, 0.6], dtype=np.float32)
    count = int(rng.integers(m.granule_count[0], m.granule_count[1] + 1))
    dyes = dyes + _granules(rng, "neutrophilic", count, mask, px_per_um)
    return CellPatch(dyes.astype(np.float32), mask, (nuc_sdf <= 0) & mask, radius)
