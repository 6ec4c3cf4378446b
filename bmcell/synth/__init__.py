"""Synthetic May-Grünwald-Giemsa bone marrow fields and crops with known truth.

The study's images are not public; this package makes specimens whose classes,
masks and lab-to-lab variation are known exactly, for the demo, tests and
benchmarks. See ``docs/synth.md`` for the morphology table and its limits.
"""

from __future__ import annotations

from bmcell.synth.dataset import (
    crop_rng,
    derived_rng,
    generate_crops,
    generate_dataset,
    lab_style,
    specimen_mix,
)
from bmcell.synth.field import CellInfo, FieldSample, render_crop, render_field
from bmcell.synth.manifest import (
    CellRecord,
    CropManifest,
    CropRecord,
    FieldRecord,
    Manifest,
    SpecimenRecord,
    load_crop_manifest,
    load_manifest,
)
from bmcell.synth.montage import montage
from bmcell.synth.morphology import DIAGNOSES, MORPHOLOGY, PX_PER_UM, Morphology, class_mix
from bmcell.synth.render import CellPatch, render_cell
from bmcell.synth.stain import LabStyle, lab_names

__all__ = [
    "DIAGNOSES",
    "MORPHOLOGY",
    "PX_PER_UM",
    "CellInfo",
    "CellPatch",
    "CellRecord",
    "CropManifest",
    "CropRecord",
    "FieldRecord",
    "FieldSample",
    "LabStyle",
    "Manifest",
    "Morphology",
    "SpecimenRecord",
    "class_mix",
    "crop_rng",
    "derived_rng",
    "generate_crops",
    "generate_dataset",
    "lab_names",
    "lab_style",
    "load_crop_manifest",
    "load_manifest",
    "montage",
    "render_cell",
    "render_crop",
    "render_field",
    "specimen_mix",
]
