"""Nucleus outlines: one tube per nucleus, sized and placed inside its cell.

The tube is built at unit width, scaled so its area gives the sampled
nucleus-to-cell ratio, curled up if it is too long to fit in the cell (a long band
nucleus becomes a C or S, as in a smear), and offset from the centre by the class'
eccentricity.
"""

from __future__ import annotations

import numpy as np

from bmcell.synth.geometry import Tube, centre_line, lobe_profile, tube_area
from bmcell.synth.morphology import Morphology

_POINTS = 24


def nucleus_tube(rng: np.random.Generator, m: Morphology, radius: float, margin: float) -> Tube:
    """A nucleus tube for a cell of ``radius`` px, at least ``margin`` px inside its edge."""
    aspect = float(rng.uniform(*m.aspect))
    lobes = int(rng.integers(m.lobes[0], m.lobes[1] + 1))
    waist = float(rng.uniform(*m.waist))
    if m.nucleus in ("kidney",):
        bend = rng.uniform(1.6, 3.0)
    elif m.nucleus in ("myeloid", "bilobed"):
        # Indentation grows with elongation: round myelocyte, kidney metamyelocyte.
        bend = (aspect - 1.0) * rng.uniform(0.5, 1.0)
    else:
        bend = rng.uniform(0.0, 0.4)
    wiggle = rng.uniform(0.0, 0.5) if aspect > 3.0 else 0.0
    angle = rng.uniform(0.0, 2 * np.pi)

    profile = lobe_profile(_POINTS, lobes, waist, rng)
    length = 2.0 * (aspect - 1.0)  # unit half-width, so stretched length / width = aspect
    target = float(rng.uniform(*m.nc_ratio)) * np.pi * radius**2
    room = radius - margin
    for _ in range(8):
        unit = Tube(centre_line(length, bend, wiggle, angle, _POINTS), profile.copy())
        tube = unit.scaled(np.sqrt(target / tube_area(unit)))
        tube = tube.moved(*(-tube.points.mean(axis=0)))
        if tube.extent() <= room:
            break
        if length > 1.0 and bend < 4.5:
            bend += 0.6  # curl a long nucleus rather than shrink it
        else:
            target *= 0.85
    if tube.extent() > room:
        tube = tube.scaled(room / tube.extent())
    slack = max(room - tube.extent(), 0.0)
    offset = rng.uniform(*m.eccentric) * slack
    direction = rng.uniform(0.0, 2 * np.pi)
    return tube.moved(offset * np.cos(direction), offset * np.sin(direction))
