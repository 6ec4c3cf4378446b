"""Typed records of a generated data set and their JSON form on disk.

Paths inside a manifest are relative to the folder holding ``manifest.json``, so a
data set can be moved or uploaded as a whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from bmcell.synth.stain import LabStyle

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class CellRecord:
    id: int
    cls: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1; x1, y1 exclusive
    touches_border: bool
    centre: tuple[int, int]
    seed: int

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "class": self.cls,
            "bbox": list(self.bbox),
            "touches_border": self.touches_border,
            "centre": list(self.centre),
            "seed": self.seed,
        }

    @classmethod
    def from_json(cls, d: dict) -> CellRecord:
        return cls(
            d["id"],
            d["class"],
            tuple(d["bbox"]),
            d["touches_border"],  # type: ignore[arg-type]
            tuple(d["centre"]),
            d["seed"],
        )  # type: ignore[arg-type]


@dataclass(frozen=True)
class FieldRecord:
    id: str
    image: str
    instances: str
    nuclei: str
    seed_key: tuple[int, ...]  # SeedSequence spawn key the field was drawn from
    cells: list[CellRecord]

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "image": self.image,
            "instances": self.instances,
            "nuclei": self.nuclei,
            "seed_key": list(self.seed_key),
            "cells": [c.to_json() for c in self.cells],
        }

    @classmethod
    def from_json(cls, d: dict) -> FieldRecord:
        return cls(
            d["id"],
            d["image"],
            d["instances"],
            d["nuclei"],
            tuple(d["seed_key"]),
            [CellRecord.from_json(c) for c in d["cells"]],
        )


@dataclass(frozen=True)
class SpecimenRecord:
    id: str
    lab: str
    diagnosis: str
    class_mix: dict[str, float]
    fields: list[FieldRecord]

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "lab": self.lab,
            "diagnosis": self.diagnosis,
            "class_mix": self.class_mix,
            "fields": [f.to_json() for f in self.fields],
        }

    @classmethod
    def from_json(cls, d: dict) -> SpecimenRecord:
        return cls(
            d["id"],
            d["lab"],
            d["diagnosis"],
            dict(d["class_mix"]),
            [FieldRecord.from_json(f) for f in d["fields"]],
        )


@dataclass(frozen=True)
class Manifest:
    seed: int
    size: int
    taxonomy: str
    classes: list[str]
    labs: dict[str, LabStyle]
    specimens: list[SpecimenRecord]
    root: Path | None = field(default=None, compare=False)

    def to_json(self) -> dict:
        return {
            "version": MANIFEST_VERSION,
            "seed": self.seed,
            "size": self.size,
            "taxonomy": self.taxonomy,
            "classes": self.classes,
            "labs": {k: v.to_json() for k, v in self.labs.items()},
            "specimens": [s.to_json() for s in self.specimens],
        }

    @classmethod
    def from_json(cls, d: dict, root: Path | None = None) -> Manifest:
        if d.get("version") != MANIFEST_VERSION:
            raise ValueError(f"unsupported manifest version {d.get('version')!r}")
        return cls(
            d["seed"],
            d["size"],
            d["taxonomy"],
            list(d["classes"]),
            {k: LabStyle.from_json(v) for k, v in d["labs"].items()},
            [SpecimenRecord.from_json(s) for s in d["specimens"]],
            root,
        )

    def fields(self) -> list[tuple[SpecimenRecord, FieldRecord]]:
        return [(s, f) for s in self.specimens for f in s.fields]


@dataclass(frozen=True)
class CropRecord:
    path: str
    lab: str
    cls: str

    def to_json(self) -> dict:
        return {"path": self.path, "lab": self.lab, "class": self.cls}


@dataclass(frozen=True)
class CropManifest:
    crops: list[CropRecord]
    root: Path | None = field(default=None, compare=False)


def _dump(data: object, path: Path) -> None:
    # Sorted keys and a fixed layout keep the file byte-identical for a given seed.
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def save_manifest(manifest: Manifest, out_dir: str | Path) -> Path:
    path = Path(out_dir) / "manifest.json"
    _dump(manifest.to_json(), path)
    return path


def load_manifest(path: str | Path) -> Manifest:
    """Read ``manifest.json`` (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    return Manifest.from_json(json.loads(path.read_text()), root=path.parent)


def save_crop_manifest(manifest: CropManifest, out_dir: str | Path) -> Path:
    path = Path(out_dir) / "crops.json"
    _dump([c.to_json() for c in manifest.crops], path)
    return path


def load_crop_manifest(path: str | Path) -> CropManifest:
    path = Path(path)
    if path.is_dir():
        path = path / "crops.json"
    rows = json.loads(path.read_text())
    return CropManifest([CropRecord(r["path"], r["lab"], r["class"]) for r in rows], path.parent)
