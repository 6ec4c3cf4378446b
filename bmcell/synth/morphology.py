"""Per-class morphology of May-Grünwald-Giemsa stained marrow cells, as data.

One ``Morphology`` row per class of ``DEFAULT_TAXONOMY``; the renderer reads only
this table, so changing how a class looks means editing a row, not code. Dye
densities are (azure, eosin): MGG's basic dye stains chromatin and RNA-rich
(basophilic) cytoplasm blue-violet, its acid dye stains haemoglobin and
eosinophil granules pink-orange. Sizes are in micrometres and converted with
``PX_PER_UM`` (a 100x oil objective scanner, about 0.125 um per pixel).

The neutrophil series MC -> MMC -> Band -> Seg is one continuum whose class
boundaries follow the JSLH criteria: the nucleus' stretched length over its width
(``aspect``) below 1.5 is round (MC), below 3 indented (MMC), 3 or more a band;
a narrowest width under a third of the widest (``waist`` < 1/3) is segmented.
Neighbouring rows share their boundary value, so a cell sampled near it is
genuinely ambiguous, as in real marrow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from bmcell.taxonomy import DEFAULT_TAXONOMY, Taxonomy

PX_PER_UM = 8.0
RBC_DIAMETER_UM = (6.8, 8.0)

Range = tuple[float, float]
Dye = tuple[float, float]

NUCLEUS_SHAPES = (
    "round",
    "oval",
    "myeloid",
    "kidney",
    "bilobed",
    "pyknotic",
    "mitotic",
    "bare",
    "artifact",
)


@dataclass(frozen=True)
class Granules:
    """How one kind of cytoplasmic granule looks: dye, blob size, where it lies."""

    dye: Dye
    sigma_um: float
    over_nucleus: bool


GRANULES: dict[str, Granules] = {
    "azurophilic": Granules(dye=(0.75, 0.75), sigma_um=0.16, over_nucleus=True),
    "neutrophilic": Granules(dye=(0.22, 0.32), sigma_um=0.09, over_nucleus=False),
    "eosinophilic": Granules(dye=(0.08, 0.95), sigma_um=0.22, over_nucleus=False),
    "basophilic": Granules(dye=(1.6, 0.55), sigma_um=0.2, over_nucleus=True),
    "azure_dust": Granules(dye=(0.35, 0.35), sigma_um=0.08, over_nucleus=False),
}


@dataclass(frozen=True)
class Morphology:
    code: str
    diameter_um: Range
    nc_ratio: Range  # nucleus area / cell area
    nucleus: str  # one of NUCLEUS_SHAPES
    cytoplasm: Dye  # (azure, eosin) density of the cytoplasm
    aspect: Range = (1.0, 1.15)  # nucleus stretched length / width
    waist: Range = (1.0, 1.0)  # narrowest / widest nucleus width
    lobes: tuple[int, int] = (1, 1)
    chromatin: Range = (0.3, 0.5)  # 0 fine, open .. 1 coarse, clumped
    chromatin_dye: Dye = (1.0, 0.75)
    nucleoli: tuple[int, int] = (0, 0)
    granules: str | None = None
    granule_count: tuple[int, int] = (0, 0)
    halo: bool = False  # pale perinuclear (Golgi) zone
    eccentric: Range = (0.0, 0.25)  # nucleus offset, fraction of the room left
    vacuoles: tuple[int, int] = (0, 0)
    notes: str = ""


MORPHOLOGY: dict[str, Morphology] = {
    m.code: m
    for m in (
        Morphology(
            "PEB",
            (15, 21),
            (0.65, 0.8),
            "round",
            (1.05, 0.08),
            chromatin=(0.2, 0.35),
            nucleoli=(1, 2),
            halo=True,
            eccentric=(0.0, 0.15),
            notes="large; deep blue cytoplasm; fine chromatin, nucleoli; pale perinuclear zone",
        ),
        Morphology(
            "PCEB",
            (10, 13.5),
            (0.45, 0.6),
            "round",
            (0.42, 0.3),
            chromatin=(0.65, 0.85),
            chromatin_dye=(1.15, 0.85),
            eccentric=(0.0, 0.15),
            notes="grey-lilac (polychromatic) cytoplasm; round nucleus, checkerboard chromatin",
        ),
        Morphology(
            "OEB",
            (8, 10.5),
            (0.18, 0.3),
            "pyknotic",
            (0.12, 0.55),
            chromatin=(0.9, 1.0),
            chromatin_dye=(1.6, 1.0),
            eccentric=(0.1, 0.6),
            notes="RBC-coloured cytoplasm; small condensed pyknotic nucleus, often eccentric",
        ),
        Morphology(
            "MB",
            (12, 19),
            (0.7, 0.85),
            "oval",
            (0.75, 0.15),
            aspect=(1.0, 1.35),
            chromatin=(0.05, 0.2),
            chromatin_dye=(0.85, 0.7),
            nucleoli=(1, 3),
            granules="azurophilic",
            granule_count=(0, 6),
            notes="high N:C; fine open chromatin, 1-3 nucleoli; blue cytoplasm, few granules",
        ),
        Morphology(
            "PMC",
            (16, 24),
            (0.45, 0.6),
            "oval",
            (0.6, 0.3),
            aspect=(1.1, 1.5),
            chromatin=(0.2, 0.35),
            chromatin_dye=(0.9, 0.7),
            nucleoli=(0, 2),
            granules="azurophilic",
            granule_count=(60, 160),
            halo=True,
            eccentric=(0.2, 0.5),
            notes="largest; eccentric oval nucleus; many coarse azurophilic granules",
        ),
        Morphology(
            "MC",
            (12, 17),
            (0.4, 0.55),
            "myeloid",
            (0.32, 0.38),
            aspect=(1.0, 1.5),
            chromatin=(0.45, 0.6),
            granules="neutrophilic",
            granule_count=(80, 160),
            eccentric=(0.2, 0.5),
            notes="round/oval nucleus (aspect < 1.5); pinkish cytoplasm, neutrophilic granules",
        ),
        Morphology(
            "MMC",
            (11, 15),
            (0.35, 0.48),
            "myeloid",
            (0.22, 0.4),
            aspect=(1.5, 3.0),
            chromatin=(0.55, 0.7),
            granules="neutrophilic",
            granule_count=(80, 160),
            eccentric=(0.1, 0.4),
            notes="indented, kidney nucleus, aspect 1.5 to < 3; lilac-pink cytoplasm",
        ),
        Morphology(
            "Band",
            (10, 14),
            (0.3, 0.42),
            "myeloid",
            (0.16, 0.42),
            aspect=(3.0, 6.0),
            waist=(0.34, 1.0),
            lobes=(1, 3),
            chromatin=(0.6, 0.75),
            granules="neutrophilic",
            granule_count=(80, 160),
            eccentric=(0.0, 0.2),
            notes="curved band nucleus, aspect >= 3; narrowest width >= 1/3 of widest",
        ),
        Morphology(
            "Seg",
            (10, 13.5),
            (0.28, 0.4),
            "myeloid",
            (0.14, 0.42),
            aspect=(3.5, 7.0),
            waist=(0.08, 0.33),
            lobes=(2, 5),
            chromatin=(0.7, 0.85),
            granules="neutrophilic",
            granule_count=(80, 160),
            eccentric=(0.0, 0.2),
            notes="2-5 lobes joined by filaments narrower than 1/3 of the lobe width",
        ),
        Morphology(
            "EO",
            (12, 16),
            (0.3, 0.4),
            "bilobed",
            (0.15, 0.35),
            aspect=(2.6, 4.0),
            waist=(0.12, 0.35),
            lobes=(2, 2),
            chromatin=(0.6, 0.8),
            granules="eosinophilic",
            granule_count=(140, 260),
            eccentric=(0.0, 0.2),
            notes="bilobed nucleus; cytoplasm packed with coarse orange granules",
        ),
        Morphology(
            "BA",
            (10, 14),
            (0.3, 0.45),
            "kidney",
            (0.25, 0.3),
            aspect=(1.3, 2.4),
            chromatin=(0.5, 0.7),
            granules="basophilic",
            granule_count=(50, 110),
            notes="dark purple-black granules, also over the nucleus, obscuring it",
        ),
        Morphology(
            "MO",
            (15, 20),
            (0.4, 0.55),
            "kidney",
            (0.5, 0.32),
            aspect=(1.6, 2.8),
            chromatin=(0.15, 0.3),
            chromatin_dye=(0.85, 0.7),
            granules="azure_dust",
            granule_count=(40, 100),
            vacuoles=(0, 6),
            eccentric=(0.0, 0.3),
            notes="large folded/kidney nucleus, lacy chromatin; grey-blue cytoplasm, vacuoles",
        ),
        Morphology(
            "LY",
            (7.5, 11),
            (0.72, 0.88),
            "round",
            (0.62, 0.08),
            chromatin=(0.75, 0.9),
            chromatin_dye=(1.3, 0.85),
            eccentric=(0.0, 0.3),
            notes="small; dense round nucleus; thin rim of sky-blue cytoplasm",
        ),
        Morphology(
            "PC",
            (10, 15),
            (0.3, 0.42),
            "round",
            (1.1, 0.12),
            aspect=(1.0, 1.25),
            chromatin=(0.85, 1.0),
            chromatin_dye=(1.2, 0.8),
            halo=True,
            eccentric=(0.5, 0.8),
            notes="eccentric clock-face nucleus; deep blue cytoplasm; perinuclear halo",
        ),
        Morphology(
            "MIT",
            (13, 19),
            (0.3, 0.45),
            "mitotic",
            (0.5, 0.22),
            chromatin_dye=(1.5, 0.95),
            notes="no nuclear membrane; condensed chromosomes as a plate or two groups",
        ),
        Morphology(
            "BN",
            (7, 12),
            (1.0, 1.0),
            "bare",
            (0.0, 0.0),
            aspect=(1.0, 1.6),
            chromatin=(0.2, 0.5),
            chromatin_dye=(0.85, 0.7),
            notes="nucleus without cytoplasm, loosened smudgy chromatin, ragged edge",
        ),
        Morphology(
            "ART",
            (9, 22),
            (0.2, 0.6),
            "artifact",
            (0.3, 0.3),
            granules="neutrophilic",
            granule_count=(0, 60),
            notes="smudge cells, debris fragments, broken cells spilling granules",
        ),
    )
}


def check_table(taxonomy: Taxonomy = DEFAULT_TAXONOMY) -> None:
    """Fail loudly if the table and the taxonomy disagree."""
    missing = set(taxonomy.codes) - set(MORPHOLOGY)
    if missing:
        raise ValueError(f"no synthetic morphology for classes {sorted(missing)}")
    for m in MORPHOLOGY.values():
        if m.nucleus not in NUCLEUS_SHAPES:
            raise ValueError(f"{m.code}: unknown nucleus shape {m.nucleus!r}")
        if m.granules is not None and m.granules not in GRANULES:
            raise ValueError(f"{m.code}: unknown granules {m.granules!r}")


check_table()

# Diagnosis-driven class mixes (relative weights). Every class keeps a small weight so
# any specimen can show any class; the base is a normal adult myelogram.
_NORMAL: dict[str, float] = {
    "PEB": 2,
    "PCEB": 12,
    "OEB": 6,
    "MB": 2,
    "PMC": 4,
    "MC": 10,
    "MMC": 9,
    "Band": 10,
    "Seg": 12,
    "EO": 3,
    "BA": 1,
    "MO": 3,
    "LY": 12,
    "PC": 2,
    "MIT": 1,
    "BN": 3,
    "ART": 4,
}


def _mix(**changes: float) -> dict[str, float]:
    return {code: changes.get(code, weight) for code, weight in _NORMAL.items()}


DIAGNOSES: dict[str, dict[str, float]] = {
    "normal": _mix(),
    "AML": _mix(MB=45, PMC=6, PCEB=5, OEB=3, MMC=4, Band=4, Seg=4),
    "CML": _mix(MC=16, MMC=16, Band=16, Seg=16, EO=6, BA=4, PCEB=4, OEB=2, LY=5),
    "myeloma": _mix(PC=35, LY=8, PCEB=7),
    "MDS": _mix(MB=8, PEB=5, PCEB=18, OEB=10, MIT=2, Seg=7),
    "anemia": _mix(PEB=5, PCEB=24, OEB=14, MIT=2),
}
DIAGNOSIS_WEIGHTS: dict[str, float] = {
    "normal": 3,
    "AML": 1,
    "CML": 1,
    "myeloma": 1,
    "MDS": 1,
    "anemia": 1,
}


def class_mix(diagnosis: str) -> dict[str, float]:
    """Normalised class frequencies for a diagnosis."""
    try:
        weights = DIAGNOSES[diagnosis]
    except KeyError:
        raise KeyError(
            f"unknown diagnosis {diagnosis!r}; expected one of {sorted(DIAGNOSES)}"
        ) from None
    total = sum(weights.values())
    return {code: w / total for code, w in weights.items()}


def normalise_mix(mix: Mapping[str, float]) -> tuple[list[str], list[float]]:
    """Codes and probabilities, checked against the morphology table."""
    unknown = set(mix) - set(MORPHOLOGY)
    if unknown:
        raise KeyError(f"class mix names unknown classes {sorted(unknown)}")
    codes = [c for c in DEFAULT_TAXONOMY.codes if mix.get(c, 0) > 0]
    total = sum(mix[c] for c in codes)
    if total <= 0:
        raise ValueError("class mix has no positive weight")
    return codes, [mix[c] / total for c in codes]
