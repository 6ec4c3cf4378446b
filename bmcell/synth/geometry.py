"""Shape primitives as signed distance fields on a local pixel grid.

Every shape is a signed distance (negative inside) evaluated on a small patch
around one cell, so drawing costs a few array operations per cell instead of a
Python loop per pixel. A nucleus is a "tube": a centre line with a width at each
point, which covers round, oval, kidney, band and segmented nuclei with one
primitive: the JSLH measurements (length over width, narrowest over widest width)
are then parameters of the tube rather than something measured after the fact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Grid:
    """Pixel centre coordinates of a square patch, origin at the patch centre."""

    y: np.ndarray
    x: np.ndarray

    @classmethod
    def square(cls, half: int) -> Grid:
        coords = np.arange(-half, half + 1, dtype=np.float32)
        y, x = np.meshgrid(coords, coords, indexing="ij")
        return cls(y=y, x=x)

    @property
    def shape(self) -> tuple[int, int]:
        return self.y.shape  # type: ignore[return-value]


@dataclass(frozen=True)
class Tube:
    """Centre line points (n, 2) as (x, y) and the half-width at each point."""

    points: np.ndarray
    radii: np.ndarray

    def scaled(self, factor: float) -> Tube:
        return Tube(self.points * factor, self.radii * factor)

    def moved(self, dx: float, dy: float) -> Tube:
        return Tube(self.points + np.array([dx, dy], dtype=np.float32), self.radii)

    def extent(self) -> float:
        """Largest distance of the tube's outline from the patch centre."""
        return float(np.max(np.hypot(self.points[:, 0], self.points[:, 1]) + self.radii))


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian random field with unit standard deviation and correlation length sigma."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / (float(field.std()) + 1e-6)


def disc_sdf(grid: Grid, cx: float, cy: float, radius: float) -> np.ndarray:
    return np.hypot(grid.x - cx, grid.y - cy) - radius


def ellipse_sdf(grid: Grid, radius: float, elongation: float, angle: float) -> np.ndarray:
    """Approximate signed distance of an ellipse of area pi*radius^2 centred on the patch."""
    c, s = np.cos(angle), np.sin(angle)
    u = grid.x * c + grid.y * s
    v = -grid.x * s + grid.y * c
    a = np.sqrt(elongation)
    return (np.hypot(u / a, v * a) - radius).astype(np.float32)


def tube_sdf(grid: Grid, tube: Tube) -> np.ndarray:
    """Signed distance to a tube with linearly varying width along each segment."""
    return segments_sdf(grid, tube.points[:-1], tube.points[1:], tube.radii[:-1], tube.radii[1:])


def segments_sdf(
    grid: Grid,
    p0: np.ndarray,
    p1: np.ndarray,
    r0: np.ndarray,
    r1: np.ndarray,
    reach: float = 24.0,
) -> np.ndarray:
    """Signed distance to a union of capsules p0[i]-p1[i] with end radii r0[i], r1[i].

    Exact only within ``reach`` pixels of the shape; farther pixels get a large value.
    Working on the shape's bounding box, one segment at a time, keeps the cost
    proportional to the nucleus rather than the patch.
    """
    half = grid.shape[0] // 2
    out = np.full(grid.shape, 1e3, dtype=np.float32)
    pts = np.concatenate([p0, p1])
    rad = float(max(r0.max(), r1.max())) + reach
    lo = np.clip(np.floor(pts.min(axis=0) - rad).astype(int) + half, 0, 2 * half)
    hi = np.clip(np.ceil(pts.max(axis=0) + rad).astype(int) + half + 1, 0, 2 * half + 1)
    box = (slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    gx, gy = grid.x[box], grid.y[box]
    best = np.full(gx.shape, 1e3, dtype=np.float32)
    for (ax, ay), (bx, by), ra, rb in zip(p0, p1, r0, r1, strict=True):
        dx, dy = bx - ax, by - ay
        px, py = gx - ax, gy - ay
        t = np.clip((px * dx + py * dy) / max(dx * dx + dy * dy, 1e-6), 0.0, 1.0)
        dist = np.hypot(px - t * dx, py - t * dy) - (ra + t * (rb - ra))
        np.minimum(best, dist, out=best)
    out[box] = best
    return out


def centre_line(length: float, bend: float, wiggle: float, angle: float, n: int = 24) -> np.ndarray:
    """Points (n, 2) of a smooth curve of the given length, centred on its mid point.

    ``bend`` is the total turning in radians (0 straight, pi a half circle, more a
    horseshoe); ``wiggle`` adds an S-shaped component.
    """
    t = np.linspace(0.0, 1.0, n, dtype=np.float32)
    heading = angle + bend * (t - 0.5) + wiggle * np.sin(2 * np.pi * t)
    step = length / (n - 1)
    xs = np.concatenate([[0.0], np.cumsum(np.cos(heading[:-1]) * step)])
    ys = np.concatenate([[0.0], np.cumsum(np.sin(heading[:-1]) * step)])
    pts = np.stack([xs, ys], axis=1).astype(np.float32)
    return pts - pts[n // 2]


def lobe_profile(n: int, lobes: int, waist: float, rng: np.random.Generator) -> np.ndarray:
    """Half-width multipliers along a tube: 1 in each lobe, ``waist`` at each filament.

    The narrowest point is exactly ``waist`` times the widest, which is how the JSLH
    criterion separates band (>= 1/3) from segmented (< 1/3) neutrophils.
    """
    t = np.linspace(0.0, 1.0, n, dtype=np.float32)
    profile = np.ones(n, dtype=np.float32)
    if lobes < 2 or waist >= 1.0:
        return profile
    cuts = (np.arange(1, lobes) + rng.uniform(-0.2, 0.2, lobes - 1)) / lobes
    # Snap each filament onto a centre-line point so the narrowest width is really drawn.
    cuts = t[np.clip(np.rint(cuts * (n - 1)).astype(int), 1, n - 2)]
    width = rng.uniform(0.05, 0.08) * 3 / lobes
    dip = np.max(np.exp(-(((t[:, None] - cuts[None, :]) / width) ** 2)), axis=1)
    return (1.0 - (1.0 - waist) * dip).astype(np.float32)


def tube_area(tube: Tube) -> float:
    """Area of a tube, for sizing a nucleus to a target nucleus-to-cell ratio."""
    seg = np.hypot(*np.diff(tube.points, axis=0).T)
    mean_r = 0.5 * (tube.radii[:-1] + tube.radii[1:])
    return float((2 * mean_r * seg).sum() + np.pi * tube.radii[0] * tube.radii[-1])
