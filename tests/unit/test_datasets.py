"""Import's pure parts: fitting crops into the frame, stripping metadata, mappings,
ImageFolder scans; export's RLE."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from bmcell import datasets, images
from bmcell.errors import InvalidArgument
from bmcell.taxonomy import DEFAULT_TAXONOMY
from services.labelapi import exports

LIMITS = images.Limits(max_bytes=1 << 20, max_pixels=4_000_000)


def _jpeg_with_exif(w: int, h: int) -> bytes:
    img = Image.new("RGB", (w, h), (200, 40, 90))
    exif = Image.Exif()
    exif[0x010F] = "CellaVision"  # Make
    exif[0x9286] = "patient 12345"  # UserComment
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


@pytest.mark.parametrize(("w", "h"), [(360, 363), (100, 50), (50, 100), (282, 282), (1000, 20)])
def test_fit_keeps_aspect_and_pads_with_the_crop_fill(w: int, h: int) -> None:
    rgb = np.full((h, w, 3), (10, 20, 30), dtype=np.uint8)
    fitted = datasets.fit_into_frame(rgb, 282)
    assert fitted.crop.shape == (282, 282, 3)
    x0, y0, x1, y1 = fitted.box
    assert max(x1 - x0, y1 - y0) == 282
    scale = 282 / max(w, h)  # each side within a pixel of the exact scaled size
    assert abs((x1 - x0) - w * scale) <= 1 and abs((y1 - y0) - h * scale) <= 1
    inside = fitted.crop[y0:y1, x0:x1]
    assert np.abs(inside.astype(int) - (10, 20, 30)).max() <= 2
    outside = np.ones((282, 282), bool)
    outside[y0:y1, x0:x1] = False
    assert (fitted.crop[outside] == datasets.CROP_FILL).all()
    assert (fitted.mask[~outside] == datasets.MASK_CELL).all() and (fitted.mask[outside] == 0).all()


def test_the_crop_fill_is_the_segmenters() -> None:
    from services.segmenter import instances

    assert datasets.CROP_FILL == instances.CROP_FILL
    assert datasets.MASK_CELL == instances.MASK_CELL


def test_stored_png_carries_no_metadata() -> None:
    data = _jpeg_with_exif(360, 363)
    assert b"CellaVision" in data
    rgb = images.decode_rgb(data, LIMITS).rgb
    png = images.png_bytes(datasets.fit_into_frame(rgb, 282).crop)
    assert b"CellaVision" not in png and b"patient" not in png
    with Image.open(io.BytesIO(png)) as img:
        assert img.format == "PNG" and img.size == (282, 282) and img.mode == "RGB"
        assert not img.getexif() and not img.info.get("icc_profile")
        assert set(img.info) <= {"dpi", "gamma"}


def test_bad_files_are_refused_naming_why() -> None:
    good = _jpeg_with_exif(60, 60)
    with pytest.raises(InvalidArgument, match="unsupported format"):
        images.decode_rgb(b"not an image at all", LIMITS)
    with pytest.raises(InvalidArgument, match="truncated|corrupt"):
        images.decode_rgb(good[: len(good) // 2], LIMITS)
    with pytest.raises(InvalidArgument, match="too large"):
        images.decode_rgb(good, images.Limits(max_bytes=len(good) - 1, max_pixels=10**6))
    big = io.BytesIO()
    Image.new("RGB", (3000, 3000)).save(big, format="PNG")
    with pytest.raises(InvalidArgument, match="beyond the limit"):
        images.decode_rgb(big.getvalue(), LIMITS)
    wrong = io.BytesIO()
    Image.new("F", (40, 40)).save(wrong, format="TIFF")
    with pytest.raises(InvalidArgument, match="mode"):
        images.decode_rgb(wrong.getvalue(), LIMITS)


def test_mapping_parses_and_errors_name_the_line() -> None:
    text = "# CellaVision names\nNeutrophil, segmented: Seg\nLymphocyte: LY\n'Blast': MB\n"
    assert datasets.parse_mapping(text) == {
        "Neutrophil, segmented": "Seg",
        "Lymphocyte": "LY",
        "Blast": "MB",
    }
    assert datasets.parse_mapping("") == {}
    with pytest.raises(InvalidArgument, match="line 2"):
        datasets.parse_mapping("LY: LY\nBlast: [MB\n")
    with pytest.raises(InvalidArgument, match="line 2: 'Blast' maps to 3"):
        datasets.parse_mapping("LY: LY\nBlast: 3\n")
    with pytest.raises(InvalidArgument, match="folder name: CODE"):
        datasets.parse_mapping("- LY\n- MB\n")


def test_unmapped_names_are_all_listed() -> None:
    codes = datasets.resolve_classes(["LY", "lymph"], {"lymph": "LY"}, DEFAULT_TAXONOMY)
    assert codes == {"LY": "LY", "lymph": "LY"}
    with pytest.raises(InvalidArgument) as err:
        datasets.resolve_classes(["LY", "smudge", "Giant", "x"], {"x": "NOPE"}, DEFAULT_TAXONOMY)
    assert "Giant, smudge" in str(err.value) and "NOPE" in str(err.value)
    assert err.value.field == "map"


def test_scan_imagefolder(tmp_path) -> None:
    for name in ("LY/a.png", "LY/b.JPG", "LY/sub/c.tif", "MB/d.jpeg", "MB/notes.txt", ".x/e.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    names, files, skipped = datasets.scan_imagefolder(tmp_path)
    assert names == ["LY", "MB"]
    assert [(f.class_name, f.path.name) for f in files] == [
        ("LY", "a.png"),
        ("LY", "b.JPG"),
        ("LY", "c.tif"),
        ("MB", "d.jpeg"),
    ]
    assert [p.name for p in skipped] == ["notes.txt"]


def test_rle_round_trips_with_pycocotools() -> None:
    mask_util = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    mask = rng.random((37, 51)) > 0.6
    mask[0, 0] = True
    rle = exports.rle(mask)
    assert sum(rle["counts"]) == mask.size
    compressed = mask_util.frPyObjects(rle, *rle["size"])
    assert (mask_util.decode(compressed).astype(bool) == mask).all()
    assert int(mask_util.area(compressed)) == int(mask.sum())


def test_zip_streams_without_seeking() -> None:
    class Store:
        def get(self, key: str) -> bytes:
            return key.encode()

    rows = [
        {"cell_id": i, "class_code": c, "crop_key": f"cells/{i}.png", "lab": "L", "specimen": "S"}
        for i, c in ((1, "LY"), (2, "MB"))
    ]
    data = b"".join(exports.imagefolder_zip(rows, Store()))
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert sorted(zf.namelist()) == ["LY/1.png", "MB/2.png", "manifest.csv"]
        assert zf.read("LY/1.png") == b"cells/1.png"
        assert zf.read("manifest.csv").decode().splitlines()[0].startswith("cell_id,lab,")
