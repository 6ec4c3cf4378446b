"""A labelled grid of every class, for the README and for eyeballing changes."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from bmcell.synth.dataset import crop_rng, lab_style
from bmcell.synth.field import render_crop
from bmcell.synth.stain import LabStyle
from bmcell.taxonomy import DEFAULT_TAXONOMY, Taxonomy


def montage(
    seed: int = 0,
    per_class: int = 4,
    labs: list[LabStyle] | None = None,
    tile: int = 141,
    taxonomy: Taxonomy = DEFAULT_TAXONOMY,
) -> Image.Image:
    """One row per class, ``per_class`` crops each (cycling through ``labs``), labelled."""
    styles = labs or [lab_style(seed, name) for name in ("lab-a", "lab-b", "lab-c")]
    label_w = 64
    sheet = Image.new("RGB", (label_w + per_class * tile, len(taxonomy.codes) * tile), "white")
    draw = ImageDraw.Draw(sheet)
    for row, code in enumerate(taxonomy.codes):
        draw.text((6, row * tile + tile // 2 - 6), code, fill=(0, 0, 0))
        for col in range(per_class):
            lab = styles[col % len(styles)]
            image, _ = render_crop(crop_rng(seed, lab.name, code, col), lab, code)
            small = Image.fromarray(np.asarray(image)).resize((tile, tile), Image.BILINEAR)
            sheet.paste(small, (label_w + col * tile, row * tile))
    return sheet
