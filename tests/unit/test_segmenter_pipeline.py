"""Segmenter domain code without a trained network: targets, instances, metrics, images."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bmcell.errors import InvalidArgument
from bmcell.synth import lab_style, render_field, specimen_mix
from services.segmenter import evaluate, images, instances, unet


@pytest.fixture(scope="module")
def field():
    _, mix = specimen_mix(3, 0, 0)
    return render_field(np.random.default_rng(11), lab_style(3, "lab-a"), mix, 352)


def _oracle_probs(sample) -> np.ndarray:
    """Class probabilities a perfect network would give (one-hot of the truth)."""
    target = unet.class_targets(sample.instances, sample.nuclei, scale=1.0)
    return np.eye(4, dtype=np.float32)[target].transpose(2, 0, 1)


def test_class_targets_separate_touching_cells(field) -> None:
    target = unet.class_targets(field.instances, field.nuclei)
    assert target.shape == (176, 176)
    assert set(np.unique(target)) <= {0, 1, 2, 3}
    interior = (target == unet.CYTOPLASM) | (target == unet.NUCLEUS)
    inst = field.instances[1::2, 1::2]
    # No interior pixel touches an interior pixel of another cell.
    for dy, dx in ((0, 1), (1, 0), (1, 1)):
        a = inst[: inst.shape[0] - dy, : inst.shape[1] - dx]
        b = inst[dy:, dx:]
        ia = interior[: inst.shape[0] - dy, : inst.shape[1] - dx]
        ib = interior[dy:, dx:]
        assert not np.any(ia & ib & (a != b))


def test_oracle_probabilities_give_the_true_instances(field) -> None:
    labels, nuclei = instances.label_instances(_oracle_probs(field))
    result = evaluate.compare(labels, field.instances)
    assert result.f1 == 1.0
    assert result.mean_iou > 0.97
    assert np.all((nuclei == 0) | (nuclei == labels))


def test_cells_have_crops_masks_and_border_flags(field) -> None:
    labels, nuclei = instances.label_instances(_oracle_probs(field))
    cells = instances.cells_from(field.image, labels, nuclei, 282)
    assert len(cells) == labels.max()
    for c in cells:
        x0, y0, x1, y1 = c.bbox
        assert c.touches_border == (x0 == 0 or y0 == 0 or x1 == 352 or y1 == 352)
        assert c.crop.shape == (282, 282, 3) and c.mask.shape == (282, 282)
        outside = c.mask == 0
        assert np.all(c.crop[outside] == instances.CROP_FILL)
        m = c.morphometrics
        assert m.cell_area == pytest.approx((c.mask > 0).sum(), rel=0.05) or c.touches_border
        assert 0 <= m.nucleus_cell_ratio <= 1 and 0 <= m.nucleus_width_ratio <= 1
        assert m.nucleus_area == 0 or m.nucleus_axis_ratio >= 1


def _disc(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    y, x = np.mgrid[:h, :w]
    return (x - cx) ** 2 + (y - cy) ** 2 <= r * r


def test_width_ratio_round_band_and_segmented() -> None:
    assert instances.width_ratio(_disc(60, 60, 30, 30, 20)) == pytest.approx(1.0, abs=0.2)
    # Two lobes joined by a thin filament: narrowest far below 1/3 of the widest.
    lobes = _disc(60, 120, 30, 30, 18) | _disc(60, 120, 90, 30, 18)
    lobes[29:32, 30:90] = True
    assert instances.width_ratio(lobes) < 0.2
    # A uniform bar (band): narrowest close to the widest.
    bar = np.zeros((40, 120), dtype=bool)
    bar[10:30, 10:110] = True
    assert instances.width_ratio(bar) > 0.6
    assert instances.width_ratio(np.zeros((5, 5), dtype=bool)) == 0.0


def test_compare_counts_false_positives_and_misses() -> None:
    truth = np.zeros((100, 100), dtype=np.int32)
    truth[10:40, 10:40] = 1
    truth[60:90, 60:90] = 2
    pred = np.zeros_like(truth)
    pred[12:40, 10:40] = 5  # matches 1
    pred[60:90, 5:35] = 7  # matches nothing
    r = evaluate.compare(pred, truth)
    assert (r.true_cells, r.predicted, r.matched) == (2, 2, 1)
    assert r.mean_iou == pytest.approx(28 / 30)


def _png(**info: str) -> bytes:
    buf = io.BytesIO()
    from PIL import PngImagePlugin

    meta = PngImagePlugin.PngInfo()
    for k, v in info.items():
        meta.add_text(k, v)
    Image.new("RGB", (64, 48), (200, 100, 50)).save(buf, "PNG", pnginfo=meta)
    return buf.getvalue()


def test_decode_strips_metadata() -> None:
    f = images.decode(_png(Patient="Jane Doe"), max_bytes=1 << 20, max_pixels=10_000)
    assert (f.width, f.height, f.format) == (64, 48, "PNG")
    stored = Image.open(io.BytesIO(f.png))
    assert "Patient" not in stored.info and not getattr(stored, "text", {})


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"GIF89a" + b"\0" * 100, "unsupported format"),
        (b"", "empty"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 50, "corrupt"),
    ],
)
def test_decode_refuses(data: bytes, problem: str) -> None:
    with pytest.raises(InvalidArgument, match=problem):
        images.decode(data, max_bytes=1 << 20, max_pixels=10_000)


def test_decode_refuses_truncated_too_large_and_too_many_pixels() -> None:
    good = _png()
    with pytest.raises(InvalidArgument, match="truncated"):
        images.decode(good[: len(good) // 2 + 20], max_bytes=1 << 20, max_pixels=10_000)
    with pytest.raises(InvalidArgument, match="too large"):
        images.decode(good, max_bytes=100, max_pixels=10_000)
    with pytest.raises(InvalidArgument, match="64x48 are beyond the limit.*MAX_IMAGE_PIXELS"):
        images.decode(good, max_bytes=1 << 20, max_pixels=3000)
    # The cap is per call: Pillow's process-wide guard is left as it was.
    assert Image.MAX_IMAGE_PIXELS == 1024 * 1024 * 1024 // 4 // 3  # Pillow's default


def test_weights_round_trip() -> None:
    model = unet.UNet()
    data = unet.to_bytes(model, {"note": "x"})
    assert len(data) < 2_000_000
    again, meta = unet.from_bytes(data)
    assert meta == {"note": "x"}
    probs = unet.predict_probabilities(again, np.full((50, 70, 3), 200, np.uint8))
    assert probs.shape == (4, 50, 70)
    assert np.allclose(probs.sum(axis=0), 1.0, atol=1e-4)


def test_thumb_bytes_give_the_same_tensor_as_the_crop() -> None:
    from bmcell import preprocess, thumbs

    rng = np.random.default_rng(3)
    crop = rng.integers(0, 256, (282, 282, 3), dtype=np.uint8)
    stored = thumbs.encode(preprocess.crop_to_uint8(crop, 64))
    assert len(stored) == 64 * 64 * 3
    batch = thumbs.to_batch(thumbs.decode(stored, 64)[None])
    np.testing.assert_array_equal(batch[0], preprocess.crop_to_tensor(crop, 64))
