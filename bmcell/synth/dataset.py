"""Write a synthetic data set to disk: field images with masks and a manifest, or
single-cell crops with labels.

Every lab, specimen, field and crop draws from its own generator, derived from the
run seed and its position (``numpy.random.SeedSequence`` spawn keys), so any one of
them comes out the same whatever else is generated alongside it.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from bmcell.synth.field import render_crop, render_field
from bmcell.synth.manifest import (
    CellRecord,
    CropManifest,
    CropRecord,
    FieldRecord,
    Manifest,
    SpecimenRecord,
    save_crop_manifest,
    save_manifest,
)
from bmcell.synth.morphology import DIAGNOSIS_WEIGHTS, class_mix
from bmcell.synth.stain import LabStyle, lab_names
from bmcell.taxonomy import DEFAULT_TAXONOMY

Progress = Callable[[int, int], None]  # (done, total)

_LAB, _SPECIMEN, _FIELD, _CROP = 0, 1, 2, 3


def derived_rng(seed: int, *key: int) -> np.random.Generator:
    """The generator for one item, identified by its position ``key`` under ``seed``."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def lab_index(name: str) -> int:
    for i, known in enumerate(lab_names(26 * 27)):
        if known == name:
            return i
    raise ValueError(f"lab id {name!r} is not of the form lab-a, lab-b, ...")


def lab_style(seed: int, name: str) -> LabStyle:
    return LabStyle.sample(derived_rng(seed, _LAB, lab_index(name)), name)


def specimen_mix(seed: int, lab: int, specimen: int) -> tuple[str, dict[str, float]]:
    """A specimen's diagnosis and its class mix, the diagnosis' mix with patient variation."""
    rng = derived_rng(seed, _SPECIMEN, lab, specimen)
    names = sorted(DIAGNOSIS_WEIGHTS)
    weights = np.array([DIAGNOSIS_WEIGHTS[n] for n in names], dtype=float)
    diagnosis = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    base = class_mix(diagnosis)
    jittered = {c: p * float(rng.lognormal(0.0, 0.3)) for c, p in base.items()}
    total = sum(jittered.values())
    return diagnosis, {c: round(p / total, 6) for c, p in jittered.items()}


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, compress_level=3)


def _save_ids(ids: np.ndarray, path: Path) -> None:
    if ids.max(initial=0) > 65535:
        raise ValueError(f"{path}: more than 65535 cells do not fit a 16-bit PNG")
    _save_png(ids.astype(np.uint16), path)


def _write_field(
    root: Path,
    seed: int,
    style: LabStyle,
    mix: dict[str, float],
    size: int,
    key: tuple,
    stem: str,
    field_id: str,
) -> FieldRecord:
    """Render one field from its own generator and write its image and masks."""
    sample = render_field(derived_rng(seed, *key), style, mix, size)
    _save_png(sample.image, root / f"{stem}.png")
    _save_ids(sample.instances, root / f"{stem}.instances.png")
    _save_ids(sample.nuclei, root / f"{stem}.nuclei.png")
    cells = [
        CellRecord(c.id, c.code, c.bbox, c.touches_border, c.centre, c.seed) for c in sample.cells
    ]
    return FieldRecord(
        field_id, f"{stem}.png", f"{stem}.instances.png", f"{stem}.nuclei.png", key, cells
    )


def _write_field_task(args: tuple) -> FieldRecord:
    return _write_field(*args)


def generate_dataset(
    out_dir: str | Path,
    labs: int,
    specimens: int,
    fields: int,
    seed: int,
    size: int = 704,
    progress: Progress | None = None,
    *,
    workers: int = 1,
) -> Manifest:
    """Render ``labs`` x ``specimens`` x ``fields`` fields and write them with a manifest.

    ``workers`` > 1 renders fields in that many processes; every field draws from its
    own generator, so the output is the same whatever ``workers`` is.
    """
    for name, value in (
        ("labs", labs),
        ("specimens", specimens),
        ("fields", fields),
        ("workers", workers),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if size < 64:
        raise ValueError(f"size must be >= 64, got {size}")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    names = lab_names(labs)
    styles = {name: lab_style(seed, name) for name in names}
    specs: list[tuple[str, str, str, dict[str, float]]] = []
    tasks: list[tuple] = []
    for li, lab in enumerate(names):
        for si in range(specimens):
            spec_id = f"{lab}-s{si + 1:02d}"
            diagnosis, mix = specimen_mix(seed, li, si)
            specs.append((spec_id, lab, diagnosis, mix))
            for fi in range(fields):
                stem = f"{lab}/{spec_id}/field-{fi:04d}"
                key = (_FIELD, li, si, fi)
                tasks.append(
                    (root, seed, styles[lab], mix, size, key, stem, f"{spec_id}-f{fi:04d}")
                )
    total = len(tasks)
    done: list[FieldRecord] = []
    if workers == 1:
        made = map(_write_field_task, tasks)
        pool = None
    else:
        # spawn: the caller may hold threads (gRPC, torch) that fork would copy mid-work.
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        made = pool.map(_write_field_task, tasks, chunksize=4)
    try:
        for record in made:
            done.append(record)
            if progress is not None:
                progress(len(done), total)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    records = [
        SpecimenRecord(spec_id, lab, diagnosis, mix, done[i * fields : (i + 1) * fields])
        for i, (spec_id, lab, diagnosis, mix) in enumerate(specs)
    ]
    manifest = Manifest(
        seed, size, DEFAULT_TAXONOMY.name, DEFAULT_TAXONOMY.codes, styles, records, root
    )
    save_manifest(manifest, root)
    return manifest


def crop_rng(seed: int, lab: str, code: str, index: int) -> np.random.Generator:
    return derived_rng(seed, _CROP, lab_index(lab), DEFAULT_TAXONOMY.index(code), index)


def generate_crops(
    out_dir: str | Path,
    per_class: int,
    seed: int,
    labs: int | Sequence[str] = 3,
    size: int = 282,
    progress: Progress | None = None,
) -> CropManifest:
    """Write ``per_class`` crops of every class for every lab, and ``crops.json``."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    names = lab_names(labs) if isinstance(labs, int) else list(labs)
    root = Path(out_dir)
    codes = DEFAULT_TAXONOMY.codes
    total, done = len(names) * len(codes) * per_class, 0
    records = []
    for lab in names:
        style = lab_style(seed, lab)
        for code in codes:
            for i in range(per_class):
                image, _ = render_crop(crop_rng(seed, lab, code, i), style, code, size)
                rel = f"crops/{lab}/{code}/{i:05d}.png"
                _save_png(image, root / rel)
                records.append(CropRecord(rel, lab, code))
                done += 1
                if progress is not None:
                    progress(done, total)
    manifest = CropManifest(records, root)
    root.mkdir(parents=True, exist_ok=True)
    save_crop_manifest(manifest, root)
    return manifest
