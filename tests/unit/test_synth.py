"""The synthetic specimen generator: determinism, coverage, masks that match pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bmcell.synth import (
    MORPHOLOGY,
    derived_rng,
    generate_crops,
    generate_dataset,
    lab_style,
    load_crop_manifest,
    load_manifest,
    render_cell,
    render_crop,
    render_field,
    specimen_mix,
)
from bmcell.synth.field import patch_slices
from bmcell.synth.geometry import lobe_profile
from bmcell.taxonomy import DEFAULT_TAXONOMY


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_gives_byte_identical_files_and_other_seeds_differ(tmp_path: Path) -> None:
    kwargs = {"labs": 2, "specimens": 1, "fields": 2, "size": 192}
    generate_dataset(tmp_path / "a", seed=5, **kwargs)
    generate_dataset(tmp_path / "b", seed=5, **kwargs)
    generate_dataset(tmp_path / "c", seed=6, **kwargs)
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert a == b
    assert len(a) == 1 + 2 * 2 * 3
    assert a.keys() == c.keys()
    assert a["lab-a/lab-a-s01/field-0000.png"] != c["lab-a/lab-a-s01/field-0000.png"]


def test_a_field_does_not_depend_on_how_many_others_are_generated(tmp_path: Path) -> None:
    generate_dataset(tmp_path / "small", labs=1, specimens=1, fields=1, seed=2, size=160)
    generate_dataset(tmp_path / "big", labs=2, specimens=2, fields=2, seed=2, size=160)
    name = "lab-a/lab-a-s01/field-0000.png"
    assert (tmp_path / "small" / name).read_bytes() == (tmp_path / "big" / name).read_bytes()


def test_manifest_layout_and_masks_round_trip(tmp_path: Path) -> None:
    manifest = generate_dataset(tmp_path, labs=1, specimens=1, fields=2, seed=3, size=256)
    loaded = load_manifest(tmp_path)
    assert loaded == manifest
    assert set(loaded.labs) == {"lab-a"}
    spec = loaded.specimens[0]
    assert spec.id == "lab-a-s01" and spec.diagnosis
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["specimens"][0]["fields"][0]["cells"][0].keys() >= {
        "id",
        "class",
        "bbox",
        "touches_border",
    }
    for _, field in loaded.fields():
        image = np.asarray(Image.open(tmp_path / field.image))
        instances = np.asarray(Image.open(tmp_path / field.instances)).astype(np.int32)
        nuclei = np.asarray(Image.open(tmp_path / field.nuclei)).astype(np.int32)
        assert image.shape == (256, 256, 3) and image.dtype == np.uint8
        # The recorded seed key regenerates exactly the stored masks.
        again = render_field(
            derived_rng(3, *field.seed_key), loaded.labs["lab-a"], spec.class_mix, 256
        )
        assert np.array_equal(again.instances, instances)
        assert np.array_equal(again.nuclei, nuclei)
        assert np.array_equal(again.image, image)
        for cell in field.cells:
            ys, xs = np.nonzero(instances == cell.id)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == cell.bbox
            edge = xs.min() == 0 or ys.min() == 0 or xs.max() == 255 or ys.max() == 255
            assert cell.touches_border == edge
            assert set(np.unique(nuclei[nuclei > 0])) <= set(np.unique(instances[instances > 0]))


def test_masks_match_a_cell_redrawn_alone() -> None:
    lab = lab_style(0, "lab-a")
    sample = render_field(np.random.default_rng(11), lab, {"Seg": 1, "PC": 1, "MO": 1}, 352)
    assert sample.cells
    exact = 0
    for cell in sample.cells:
        patch = render_cell(np.random.default_rng(cell.seed), cell.code)
        full_cell = np.zeros(sample.instances.shape, dtype=bool)
        full_nuc = np.zeros_like(full_cell)
        slices = patch_slices(*cell.centre, patch.half, 352)
        assert slices is not None
        fs, ps = slices
        full_cell[fs] = patch.cell[ps]
        full_nuc[fs] = patch.nucleus[ps]
        visible = sample.instances == cell.id
        assert not (visible & ~full_cell).any()
        assert not ((sample.nuclei == cell.id) & ~full_nuc).any()
        later = np.isin(sample.instances, [c.id for c in sample.cells if c.id > cell.id])
        assert np.array_equal(visible, full_cell & ~later)
        exact += int(not (full_cell & later).any())
        # Pixels agree with masks: stained nucleus is darker than the empty background.
        gray = sample.image.mean(axis=2)
        if (sample.nuclei == cell.id).sum() > 50:
            assert gray[sample.nuclei == cell.id].mean() < gray[sample.instances == 0].mean() - 40
    assert exact >= 1


def test_every_class_appears_in_100_fields() -> None:
    seen: set[str] = set()
    for i in range(100):
        lab, spec = i % 5, (i // 5) % 4
        _, mix = specimen_mix(1, lab, spec)
        style = lab_style(1, f"lab-{'abcde'[lab]}")
        sample = render_field(derived_rng(1, 2, lab, spec, i), style, mix, 352)
        seen.update(c.code for c in sample.cells)
    assert seen == set(DEFAULT_TAXONOMY.codes)


def test_crop_is_centred_and_background_is_uniform() -> None:
    lab = lab_style(0, "lab-b")
    for code in ("Seg", "BN", "ART", "PMC"):
        image, mask = render_crop(np.random.default_rng(4), lab, code)
        assert image.shape == (282, 282, 3) and image.dtype == np.uint8
        assert mask.shape == (282, 282) and mask.any()
        assert (image[~mask] == 255).all()
        ys, xs = np.nonzero(mask)
        assert abs(ys.mean() - 141) < 30 and abs(xs.mean() - 141) < 30


def test_generate_crops_writes_labelled_files(tmp_path: Path) -> None:
    manifest = generate_crops(tmp_path, per_class=1, seed=0, labs=["lab-c"])
    assert len(manifest.crops) == DEFAULT_TAXONOMY.num_classes
    rows = json.loads((tmp_path / "crops.json").read_text())
    assert rows[0] == {"path": "crops/lab-c/PEB/00000.png", "lab": "lab-c", "class": "PEB"}
    assert load_crop_manifest(tmp_path).crops == manifest.crops
    assert Image.open(tmp_path / rows[-1]["path"]).size == (282, 282)


def test_myeloid_series_follows_the_jslh_boundaries() -> None:
    mc, mmc, band, seg = (MORPHOLOGY[c] for c in ("MC", "MMC", "Band", "Seg"))
    assert mc.aspect[1] == mmc.aspect[0]
    assert mmc.aspect[1] == band.aspect[0] == 3.0
    assert seg.waist[1] < 1 / 3 <= band.waist[0]
    rng = np.random.default_rng(0)
    for waist in (0.1, 0.3, 0.5):
        assert lobe_profile(24, 3, waist, rng).min() == pytest.approx(waist, abs=1e-6)


def test_unknown_class_and_bad_counts_fail_with_the_value() -> None:
    with pytest.raises(KeyError, match="XYZ"):
        render_cell(np.random.default_rng(0), "XYZ")
    with pytest.raises(ValueError, match="fields"):
        generate_dataset("/nonexistent-never-written", labs=1, specimens=1, fields=0, seed=0)


def test_fields_rendered_in_processes_are_the_same(tmp_path) -> None:
    kwargs = dict(labs=2, specimens=1, fields=3, seed=4, size=160)
    one = generate_dataset(tmp_path / "one", **kwargs)
    two = generate_dataset(tmp_path / "two", workers=2, **kwargs)
    assert [f.id for s in one.specimens for f in s.fields] == [
        f.id for s in two.specimens for f in s.fields
    ]
    for s in one.specimens:
        for f in s.fields:
            assert (tmp_path / "one" / f.image).read_bytes() == (
                tmp_path / "two" / f.image
            ).read_bytes()
