"""Pure parts of storage integrity: content addresses, what a key is, re-cutting crops."""

from __future__ import annotations

import numpy as np

from bmcell import integrity
from bmcell.storage import content_key, digest_of_key, sha256_hex
from services.segmenter import images, instances, restore

CROP = 64


def test_digest_of_key_reads_content_addresses_only() -> None:
    digest = sha256_hex(b"x")
    assert digest_of_key(content_key("cells", digest, ".mask.png")) == digest
    assert digest_of_key(content_key("fields", digest, ".png")) == digest
    assert digest_of_key("fields/x.png") is None
    assert digest_of_key("checkpoints/job-1/checkpoint_000001/model.pt") is None


def test_keys_are_judged_by_their_prefix() -> None:
    kind = integrity._data_kind
    assert kind("cells/ab/" + "a" * 64 + ".png") == "crop"
    assert kind("cells/ab/" + "a" * 64 + ".mask.png") == "mask"
    assert kind("checkpoints/job-7/checkpoint_000003/state.pt") == "checkpoint"
    assert kind("training-jobs/job-7/progress.json") == "checkpoint"
    assert kind("models/state_dicts/bmcell-cell/v3.pt") == "state-dict"
    assert kind("reports/confusion/bmcell-cell/v3-test.png") == "confusion"
    assert kind("segmenter/unet-v1.pt") is None  # weights: not judged


def _field() -> tuple[np.ndarray, list[instances.SegmentedCell]]:
    """Two painted cells, one at the field's edge, cut exactly as the segmenter cuts."""
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    labels = np.zeros((120, 160), dtype=np.int32)
    yy, xx = np.mgrid[:120, :160]
    labels[(yy - 40) ** 2 + (xx - 50) ** 2 < 15**2] = 1
    labels[(yy - 100) ** 2 + (xx - 150) ** 2 < 12**2] = 2  # runs off the right edge
    nuclei = np.where((yy - 40) ** 2 + (xx - 50) ** 2 < 6**2, labels, 0)
    return rgb, instances.cells_from(rgb, labels, nuclei, CROP)


def _rows(cells: list[instances.SegmentedCell]) -> tuple[list[dict], dict[str, bytes]]:
    rows, stored = [], {}
    for c in cells:
        crop, mask = images.png_bytes(c.crop), images.png_bytes(c.mask)
        row = {
            "index_in_field": c.index,
            "x0": c.bbox[0],
            "y0": c.bbox[1],
            "x1": c.bbox[2],
            "y1": c.bbox[3],
            "crop_key": content_key("cells", sha256_hex(crop), ".png"),
            "mask_key": content_key("cells", sha256_hex(mask), ".mask.png"),
        }
        rows.append(row)
        stored[row["crop_key"]], stored[row["mask_key"]] = crop, mask
    return rows, stored


def test_a_lost_crop_is_cut_again_from_its_mask_without_segmenting() -> None:
    rgb, cells = _field()
    rows, stored = _rows(cells)
    lost = {r["crop_key"] for r in rows}
    masks = {r["mask_key"]: stored[r["mask_key"]] for r in rows}

    def segment() -> list[instances.SegmentedCell]:
        raise AssertionError("the mask was enough")

    got = restore.recut(rgb, rows, lost, crop_size=CROP, masks=masks, segment=segment)
    assert got == {k: stored[k] for k in lost}


def test_a_lost_mask_needs_segmentation_and_a_wrong_one_is_refused() -> None:
    rgb, cells = _field()
    rows, stored = _rows(cells)
    lost = {rows[0]["mask_key"], rows[1]["crop_key"], rows[1]["mask_key"]}
    got = restore.recut(rgb, rows, lost, crop_size=CROP, masks={}, segment=lambda: cells)
    assert got == {k: stored[k] for k in lost}
    # A segmentation that differs (here: the cells swapped) restores nothing.
    swapped = [cells[1], cells[0]]
    swapped = [
        instances.SegmentedCell(i, c.bbox, c.touches_border, c.morphometrics, c.crop, c.mask)
        for i, c in enumerate(swapped)
    ]
    assert restore.recut(rgb, rows, lost, crop_size=CROP, masks={}, segment=lambda: swapped) == {}
