"""Differential count maths and rendering (``bmcell.report``) on synthetic rows."""

from __future__ import annotations

import io
import random

import pytest
from PIL import Image

from bmcell import report as rep
from bmcell.errors import InvalidArgument
from bmcell.taxonomy import DEFAULT_TAXONOMY


def rows(spec: dict[str, list[float]], *, start: int = 1) -> list[dict]:
    """Cell rows: class -> the p1 of each of its cells."""
    out, i = [], start
    for code, ps in spec.items():
        for p in ps:
            out.append({"cell_id": i, "status": "unlabelled", "top1": code, "p1": p})
            i += 1
    return out


def test_largest_remainder_sums_to_exactly_100() -> None:
    assert rep.largest_remainder({"a": 1, "b": 1, "c": 1}) == {"a": 33.4, "b": 33.3, "c": 33.3}
    assert rep.largest_remainder({"a": 0, "b": 0}) == {"a": 0.0, "b": 0.0}
    assert rep.largest_remainder({"a": 7}) == {"a": 100.0}
    rng = random.Random(0)
    for _ in range(500):
        counts = {f"k{i}": rng.choice([0, 0, 1, 2, 3, 7, 50, 999]) for i in range(17)}
        if not sum(counts.values()):
            continue
        for decimals in (0, 1, 2):
            pct = rep.largest_remainder(counts, decimals)
            scale = 10**decimals
            assert sum(round(v * scale) for v in pct.values()) == 100 * scale
            total = sum(counts.values())
            for k, v in counts.items():
                # never more than one printed unit from the exact share
                assert abs(pct[k] - 100 * v / total) < 1 / scale + 1e-9
                if v == 0:
                    assert pct[k] == 0
    with pytest.raises(ValueError):
        rep.largest_remainder({"a": -1, "b": 2})


def test_differential_counts_ratio_and_low_confidence() -> None:
    cells = rows(
        {
            "MB": [0.95, 0.55],
            "Seg": [0.9, 0.99, 0.3],
            "PCEB": [0.8],
            "OEB": [0.7, 0.59],
            "LY": [0.99],
        }
    )
    cells += [
        {"cell_id": 100, "status": "excluded", "top1": "MB", "p1": 0.99},
        {"cell_id": 101, "status": "unlabelled", "top1": None, "p1": None},
        {"cell_id": 102, "status": "labelled", "top1": None, "p1": None},
    ]
    d = rep.differential(cells, DEFAULT_TAXONOMY, min_confidence=0.6)
    assert d["cells"] == {"counted": 11, "classified": 9, "unclassified": 2, "excluded": 1}
    assert d["counts"]["MB"] == 2 and d["counts"]["Seg"] == 3 and d["counts"]["unclassified"] == 2
    assert round(sum(d["percentages"].values()), 6) == 100.0
    assert sum(c["percent"] for c in d["classes"]) == pytest.approx(100.0)
    assert [c["code"] for c in d["classes"]] == DEFAULT_TAXONOMY.codes
    # myeloid MB 2 + Seg 3 = 5; erythroid PCEB 1 + OEB 2 = 3; LY is neither
    assert (d["myeloid"], d["erythroid"]) == (5, 3)
    assert d["me_ratio"] == pytest.approx(5 / 3, abs=1e-3)
    assert [x["cell_id"] for x in d["low_confidence"]] == [5, 2, 8]  # by p1 ascending
    assert d["low_confidence"][0] == {"cell_id": 5, "top1": "Seg", "p1": 0.3}
    assert any("unclassified" in n for n in d["notes"])


def test_me_ratio_without_erythroid_is_none_and_bad_threshold_refused() -> None:
    d = rep.differential(rows({"MB": [0.9]}), DEFAULT_TAXONOMY)
    assert d["me_ratio"] is None and d["percentages"]["MB"] == 100.0
    assert rep.me_ratio({"PEB": 2, "MC": 3, "EO": 1}, DEFAULT_TAXONOMY) == 2.0
    with pytest.raises(InvalidArgument):
        rep.differential([], DEFAULT_TAXONOMY, min_confidence=1.5)
    empty = rep.differential([], DEFAULT_TAXONOMY)
    assert empty["cells"]["counted"] == 0 and set(empty["percentages"].values()) == {0.0}
    with pytest.raises(ValueError, match="not in"):
        rep.differential(rows({"XX": [0.9]}), DEFAULT_TAXONOMY)


def _crop(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (282, 282), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_html_is_self_contained_with_every_present_class() -> None:
    cells = rows({"MB": [0.95, 0.5, 0.8], "PEB": [0.9], "Band": [0.99]})
    d = rep.differential(cells, DEFAULT_TAXONOMY)
    body = {
        "lab": "lab-<a>",
        "specimen": "s1",
        "diagnosis": "AML",
        "is_test": False,
        "model": {"name": "bmcell-cell", "version": 3},
        "taxonomy": "jslh-17",
        "generated_at": "2025-01-01T00:00:00+00:00",
        **d,
        "_cells": [{**c, "crop_key": f"cells/{c['cell_id']}.png"} for c in cells],
    }
    assert "_cells" not in rep.public(body)
    crops = {f"cells/{c['cell_id']}.png": _crop((200, 80, 90)) for c in cells}
    crops.pop("cells/5.png")  # a missing crop leaves a blank tile
    thumbs = rep.thumbnails(body, crops.__getitem__, per_class=2)
    assert set(thumbs) == {1, 3, 4}  # MB's two most confident (0.95, 0.8), PEB; not Band
    assert rep.gallery_cells(body, 2)["MB"][0]["cell_id"] == 1
    page = rep.render_html(body, thumbs, per_class=2)
    assert page.startswith("<!doctype html>") and "<style>" in page
    assert "lab-&lt;a&gt;" in page and "lab-<a>" not in page
    for code in ("MB", "PEB", "Band"):
        assert f'id="class-{code}"' in page
    assert page.count("data:image/png;base64,") == 3 and "class=blank" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from outside
    assert "100.0%" in page and "M" in page
    text = rep.to_text(body)
    assert "MB" in text and "PEB" in text
