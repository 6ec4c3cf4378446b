"""Cell classes and how evaluation merges them.

The default is the study's taxonomy: 17 training classes, with bare nuclei (BN) and
artifacts (ART) merged into one class for evaluation (16 evaluation classes). A lab
may load another taxonomy from JSON; nothing else in bmcell hard-codes class names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class CellClass:
    code: str
    name: str


DEFAULT_CLASSES: tuple[CellClass, ...] = (
    CellClass("PEB", "proerythroblast / basophilic erythroblast"),
    CellClass("PCEB", "polychromatic erythroblast"),
    CellClass("OEB", "orthochromatic erythroblast"),
    CellClass("MB", "myeloblast"),
    CellClass("PMC", "promyelocyte"),
    CellClass("MC", "myelocyte"),
    CellClass("MMC", "metamyelocyte"),
    CellClass("Band", "band neutrophil"),
    CellClass("Seg", "segmented neutrophil"),
    CellClass("EO", "eosinophil"),
    CellClass("BA", "basophil / mast cell"),
    CellClass("MO", "monocyte"),
    CellClass("LY", "lymphocyte"),
    CellClass("PC", "plasma cell"),
    CellClass("MIT", "mitotic cell"),
    CellClass("BN", "bare nucleus"),
    CellClass("ART", "artifact"),
)


@dataclass(frozen=True)
class Taxonomy:
    """Ordered training classes plus the merge used for evaluation.

    ``eval_merge`` maps a training class code to the evaluation class it counts as;
    codes absent from it evaluate as themselves.
    """

    name: str
    classes: tuple[CellClass, ...]
    eval_merge: dict[str, str] = field(default_factory=dict)
    myeloid: tuple[str, ...] = ()
    erythroid: tuple[str, ...] = ()
    # A differential count's blast percentage counts these; the classes left out of
    # its percentages (bare nuclei, artifacts: not nucleated cells, ICSH) are reported apart.
    blasts: tuple[str, ...] = ()
    not_counted: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        codes = [c.code for c in self.classes]
        if len(set(codes)) != len(codes):
            raise ValueError(f"taxonomy {self.name!r} repeats a class code: {codes}")
        unknown = set(self.eval_merge) - set(codes)
        if unknown:
            raise ValueError(f"taxonomy {self.name!r} merges unknown classes: {sorted(unknown)}")

    @property
    def codes(self) -> list[str]:
        return [c.code for c in self.classes]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def index(self, code: str) -> int:
        try:
            return self.codes.index(code)
        except ValueError:
            raise KeyError(f"unknown class {code!r}; expected one of {self.codes}") from None

    @property
    def eval_codes(self) -> list[str]:
        """Evaluation classes, in training order of their first member."""
        seen: list[str] = []
        for code in self.codes:
            target = self.eval_merge.get(code, code)
            if target not in seen:
                seen.append(target)
        return seen

    def eval_index_map(self) -> list[int]:
        """For each training class index, the index of its evaluation class."""
        eval_codes = self.eval_codes
        return [eval_codes.index(self.eval_merge.get(c, c)) for c in self.codes]

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "classes": [{"code": c.code, "name": c.name} for c in self.classes],
            "eval_merge": self.eval_merge,
            "myeloid": list(self.myeloid),
            "erythroid": list(self.erythroid),
            "blasts": list(self.blasts),
            "not_counted": list(self.not_counted),
        }

    @classmethod
    def from_json(cls, data: dict) -> Taxonomy:
        return cls(
            name=data["name"],
            classes=tuple(CellClass(c["code"], c["name"]) for c in data["classes"]),
            eval_merge=dict(data.get("eval_merge", {})),
            myeloid=tuple(data.get("myeloid", ())),
            erythroid=tuple(data.get("erythroid", ())),
            blasts=tuple(data.get("blasts", ())),
            not_counted=tuple(data.get("not_counted", ())),
        )

    @classmethod
    def load(cls, path: str | Path) -> Taxonomy:
        return cls.from_json(json.loads(Path(path).read_text()))


DEFAULT_TAXONOMY = Taxonomy(
    name="jslh-17",
    classes=DEFAULT_CLASSES,
    eval_merge={"BN": "BN+ART", "ART": "BN+ART"},
    myeloid=("MB", "PMC", "MC", "MMC", "Band", "Seg", "EO", "BA", "MO"),
    erythroid=("PEB", "PCEB", "OEB"),
    blasts=("MB",),
    not_counted=("BN", "ART"),
)
