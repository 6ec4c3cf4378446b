"""Simulated reviewers without a server: decisions, wrong classes, truth placement."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from bmcell.review_sim import (
    MATURATION_SERIES,
    TruthIndex,
    bbox_iou,
    decide,
    match_cell,
    wrong_class,
)
from bmcell.storage import sha256_hex
from bmcell.synth import generate_dataset
from bmcell.taxonomy import DEFAULT_TAXONOMY


def task(i: int, *, suggested: str | None = None, top: list[str] | None = None) -> dict:
    return {
        "task_id": i,
        "kind": "cst" if suggested else "al",
        "reviews_so_far": 0,
        "suggested_class": suggested,
        "top": [{"class_code": c, "probability": 0.5} for c in (top or [])],
    }


def test_decisions_follow_truth_and_rates_deterministically() -> None:
    right = decide(task(1, suggested="MB"), "MB", error_rate=0, difficult_rate=0, seed=0)
    assert (right.answer, right.class_code, right.send_class) == ("confirm", "MB", False)
    fix = decide(task(2, suggested="MB"), "PMC", error_rate=0, difficult_rate=0, seed=0)
    assert (fix.answer, fix.class_code, fix.send_class) == ("correct", "PMC", True)
    al = decide(task(3, top=["Seg", "Band"]), "Seg", error_rate=0, difficult_rate=0, seed=0)
    assert al.answer == "confirm" and al.class_code == "Seg"
    unknown = decide(task(4, suggested="MB"), None, error_rate=0, difficult_rate=0, seed=0)
    assert unknown.answer == "difficult"
    assert (
        decide(
            task(4, suggested="MB"),
            None,
            error_rate=0,
            difficult_rate=0,
            seed=0,
            on_unknown="confirm",
        ).answer
        == "confirm"
    )

    n = 4000
    ds = [
        decide(task(i, suggested="MC"), "MC", error_rate=0.3, difficult_rate=0.1, seed=7)
        for i in range(n)
    ]
    again = [
        decide(task(i, suggested="MC"), "MC", error_rate=0.3, difficult_rate=0.1, seed=7)
        for i in range(n)
    ]
    assert ds == again
    difficult = sum(d.answer == "difficult" for d in ds)
    wrong = sum(d.error for d in ds)
    assert abs(difficult / n - 0.1) < 0.02
    assert abs(wrong / (n - difficult) - 0.3) < 0.03
    assert all(d.class_code != "MC" for d in ds if d.error)
    assert all((d.class_code == "MC") == (d.answer == "confirm") for d in ds if d.class_code)


def test_wrong_classes_prefer_maturation_neighbours() -> None:
    rng = random.Random(1)
    picks = Counter(wrong_class("MMC", rng) for _ in range(3000))
    assert "MMC" not in picks
    assert (picks["MC"] + picks["Band"]) / 3000 > 0.75
    assert set(picks) - {"MC", "Band"}  # sometimes any other class
    ery = Counter(wrong_class("PEB", rng) for _ in range(1000))
    assert ery.most_common(1)[0][0] == "PCEB"
    for series in MATURATION_SERIES:
        assert set(series) <= set(DEFAULT_TAXONOMY.codes)


def test_bbox_iou() -> None:
    assert bbox_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert bbox_iou((0, 0, 10, 10), (10, 10, 20, 20)) == 0.0
    assert bbox_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("synth")
    return generate_dataset(root, labs=1, specimens=1, fields=2, seed=3, size=512), root


def test_truth_index_places_segmented_cells_by_sha_and_instances(dataset) -> None:
    manifest, root = dataset
    spec = manifest.specimens[0]
    cells, want = [], {}
    cid = 1000
    for fid, rec in enumerate(spec.fields, start=1):
        sha = sha256_hex((root / rec.image).read_bytes())
        for c in rec.cells:
            x0, y0, x1, y1 = c.bbox
            # a segmenter's bbox is close to, not equal to, the true one
            cells.append(
                {
                    "id": cid,
                    "field_id": fid,
                    "field_sha256": sha,
                    "x0": x0 + 2,
                    "y0": y0 - 1,
                    "x1": x1 - 1,
                    "y1": y1 + 2,
                }
            )
            want[cid] = c.cls
            cid += 1
    assert want, "the tiny data set should hold cells"
    # a detection on empty background, and a field nobody knows
    sha1 = cells[0]["field_sha256"]
    cells.append(
        {
            "id": 1,
            "field_id": cells[0]["field_id"],
            "field_sha256": sha1,
            "x0": 0,
            "y0": 0,
            "x1": 2,
            "y1": 2,
        }
    )
    cells.append(
        {"id": 2, "field_id": 99, "field_sha256": "0" * 64, "x0": 0, "y0": 0, "x1": 50, "y1": 50}
    )
    index = TruthIndex.from_rows(manifest, cells)
    got = {k: index.truth(k) for k in want}
    assert got == want
    assert index.truth(2) is None and index.truth(123456) is None
    assert index.mapping() == {k: v for k, v in want.items()} | (
        {1: index.truth(1)} if index.truth(1) else {}
    )


def test_match_cell_needs_overlap(dataset) -> None:
    manifest, root = dataset
    rec = manifest.specimens[0].fields[-1]
    from bmcell.review_sim import _read_ids

    ids = _read_ids(root / rec.instances)
    c = rec.cells[0]
    assert match_cell(rec, ids, c.bbox) == c
    x0, y0, x1, y1 = c.bbox
    far = (x0, y0, x0 + max(2, (x1 - x0) // 6), y0 + max(2, (y1 - y0) // 6))
    assert match_cell(rec, ids, far) is None  # a sliver of the cell: IoU too low


def test_truth_index_loads_a_fallback_mapping(tmp_path: Path) -> None:
    path = tmp_path / "truth.json"
    path.write_text(json.dumps({"5": "MB", "6": "Seg"}))
    index = TruthIndex.load(path)
    assert index.truth(5) == "MB" and index.truth(6) == "Seg" and index.truth(7) is None
    assert len(index) == 2
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"cell_id": 8, "class": "LY"}]))
    assert TruthIndex.load(listed).truth(8) == "LY"
    with pytest.raises(ValueError, match="needs the segmenter"):
        manifest = tmp_path / "m" / "manifest.json"
        manifest.parent.mkdir()
        manifest.write_text(json.dumps({"version": 1, "specimens": []}))
        TruthIndex.load(manifest.parent)
