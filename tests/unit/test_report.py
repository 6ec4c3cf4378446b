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
    assert d["cells"] == {
        "total": 12,
        "border": 1,
        "nucleated": 9,
        "apart": 0,
        "unclassified": 2,
        "reviewed": 0,
        "predicted": 9,
    }
    by = {c["code"]: c for c in d["classes"]}
    assert by["MB"]["count"] == 2 and by["Seg"]["count"] == 3 and by["Seg"]["predicted"] == 3
    assert round(sum(d["percentages"].values()), 6) == 100.0
    assert sum(c["percent"] for c in d["classes"]) == pytest.approx(100.0)
    assert [c["code"] for c in d["classes"]] == [
        c for c in DEFAULT_TAXONOMY.codes if c not in ("BN", "ART")
    ]
    # myeloid MB 2 + Seg 3 = 5; erythroid PCEB 1 + OEB 2 = 3; LY is neither
    assert (d["myeloid"], d["erythroid"]) == (5, 3)
    assert d["me_ratio"] == pytest.approx(5 / 3, abs=1e-3)
    assert [x["cell_id"] for x in d["low_confidence"]] == [5, 2, 8]  # by p1 ascending
    assert d["low_confidence"][0] == {"cell_id": 5, "top1": "Seg", "p1": 0.3}
    assert any("neither a reviewer" in w for w in d["warnings"])
    assert any("at least 500" in w for w in d["warnings"])


def test_reviewed_labels_count_ahead_of_predictions() -> None:
    cells = rows({"MB": [0.9, 0.4], "Seg": [0.8]})
    cells[0]["label"] = "PMC"  # a reviewer said promyelocyte: the prediction is ignored
    cells[1]["label"] = "MB"  # reviewed, so not low-confidence even at p1 0.4
    cells.append({"cell_id": 50, "status": "labelled", "label": "LY", "top1": None, "p1": None})
    d = rep.differential(cells, DEFAULT_TAXONOMY)
    by = {c["code"]: c for c in d["classes"]}
    assert (by["PMC"]["reviewed"], by["PMC"]["predicted"]) == (1, 0)
    assert (by["MB"]["count"], by["MB"]["reviewed"], by["MB"]["predicted"]) == (1, 1, 0)
    assert (by["Seg"]["reviewed"], by["Seg"]["predicted"]) == (0, 1)
    assert by["LY"]["reviewed"] == 1
    assert (d["cells"]["reviewed"], d["cells"]["predicted"]) == (3, 1)
    assert d["low_confidence"] == [] and d["cells"]["unclassified"] == 0
    for c in d["classes"]:
        assert c["count"] == c["reviewed"] + c["predicted"]


def test_bare_nuclei_and_artifacts_apart_lineages_and_blasts() -> None:
    cells = rows(
        {
            "MB": [0.9] * 3,
            "Seg": [0.9] * 3,
            "PEB": [0.9] * 2,
            "LY": [0.9] * 2,
            "BN": [0.9] * 5,
            "ART": [0.9] * 7,
        }
    )
    d = rep.differential(cells, DEFAULT_TAXONOMY)
    assert d["cells"]["nucleated"] == 10 and d["cells"]["apart"] == 12
    assert "BN" not in d["percentages"] and "ART" not in d["percentages"]
    apart = {c["code"]: c["count"] for c in d["apart"]}
    assert apart == {"BN": 5, "ART": 7}
    assert d["percentages"]["MB"] == 30.0 and d["percentages"]["LY"] == 20.0
    lin = {x["name"]: x for x in d["lineages"]}
    assert (lin["myeloid"]["count"], lin["myeloid"]["percent"]) == (6, 60.0)
    assert (lin["erythroid"]["count"], lin["erythroid"]["percent"]) == (2, 20.0)
    assert (lin["other"]["count"], lin["other"]["percent"]) == (2, 20.0)
    assert "LY" in lin["other"]["codes"] and "BN" not in lin["other"]["codes"]
    assert sum(x["percent"] for x in d["lineages"]) == pytest.approx(100.0)
    assert d["blasts"] == {"codes": ["MB"], "count": 3, "percent": 30.0}
    assert d["me_ratio"] == 3.0


def test_warning_below_500_nucleated_cells_not_counting_apart() -> None:
    few = rows({"Seg": [0.9] * 499, "BN": [0.9] * 10})
    assert any("499" in w and "500" in w for w in rep.differential(few)["warnings"])
    enough = rows({"Seg": [0.9] * 500})
    assert rep.differential(enough)["warnings"] == []


def test_state_digest_follows_classes_and_sources_only() -> None:
    cells = rows({"MB": [0.9], "Seg": [0.8]})
    base = rep.state_digest(cells)
    assert base == rep.state_digest(list(reversed(cells)))  # order does not matter
    assert base == rep.state_digest([*cells, {"cell_id": 9, "status": "excluded", "top1": "MB"}])
    relabel = [{**cells[0], "label": "MB"}, cells[1]]  # same class, now reviewed
    assert rep.state_digest(relabel) != base
    repredict = [cells[0], {**cells[1], "top1": "Band"}]
    assert rep.state_digest(repredict) != base
    assert rep.differential(cells)["digest"] == base


def test_verification_view_not_verified_fresh_and_stale() -> None:
    from datetime import UTC, datetime

    assert rep.verification_view(None, "d" * 64) == {"verified": False, "text": "not verified"}
    row = {
        "verified_by": "dr-a",
        "verified_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        "model_version": 3,
        "digest": "a" * 64,
    }
    fresh = rep.verification_view(row, "a" * 64)
    assert fresh["text"] == "verified by dr-a at 2026-01-02T03:04:05+00:00"
    assert fresh["stale"] is False
    stale = rep.verification_view(row, "b" * 64)
    assert stale["stale"] is True and "stale" in stale["text"]


def test_taxonomy_round_trip_keeps_blasts_and_classes_apart() -> None:
    from bmcell.taxonomy import Taxonomy

    again = Taxonomy.from_json(DEFAULT_TAXONOMY.to_json())
    assert again.blasts == ("MB",) and again.not_counted == ("BN", "ART")
    old = DEFAULT_TAXONOMY.to_json()
    del old["blasts"], old["not_counted"]  # stored by a model version before issue 14
    assert rep.report_taxonomy(Taxonomy.from_json(old)) == DEFAULT_TAXONOMY


def test_me_ratio_without_erythroid_is_none_and_bad_threshold_refused() -> None:
    d = rep.differential(rows({"MB": [0.9]}), DEFAULT_TAXONOMY)
    assert d["me_ratio"] is None and d["percentages"]["MB"] == 100.0
    assert rep.me_ratio({"PEB": 2, "MC": 3, "EO": 1}, DEFAULT_TAXONOMY) == 2.0
    with pytest.raises(InvalidArgument):
        rep.differential([], DEFAULT_TAXONOMY, min_confidence=1.5)
    empty = rep.differential([], DEFAULT_TAXONOMY)
    assert empty["cells"]["nucleated"] == 0 and set(empty["percentages"].values()) == {0.0}
    with pytest.raises(ValueError, match="not in"):
        rep.differential(rows({"XX": [0.9]}), DEFAULT_TAXONOMY)


def _crop(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (282, 282), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_html_is_self_contained_prints_on_a4_with_every_present_class() -> None:
    cells = rows({"MB": [0.95, 0.5, 0.8], "PEB": [0.9], "Band": [0.99], "BN": [0.9]})
    cells[4]["label"] = "Band"
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
        "verification": rep.verification_view(None, d["digest"]),
        "_cells": [
            {
                "cell_id": c["cell_id"],
                "class": rep.counted_class(c)[0],
                "reviewed": bool(c.get("label")),
                "p1": 1.0 if c.get("label") else c["p1"],
                "crop_key": f"cells/{c['cell_id']}.png",
            }
            for c in cells
        ],
    }
    assert "_cells" not in rep.public(body)
    crops = {f"cells/{c['cell_id']}.png": _crop((200, 80, 90)) for c in cells}
    crops.pop("cells/5.png")  # a missing crop leaves a blank tile
    thumbs = rep.thumbnails(body, crops.__getitem__, per_class=2)
    assert set(thumbs) == {1, 3, 4, 6}  # MB's two most confident (0.95, 0.8), PEB, BN
    assert rep.gallery_cells(body, 2)["MB"][0]["cell_id"] == 1
    page = rep.render_html(body, thumbs, per_class=2)
    assert page.startswith("<!doctype html>") and "<style>" in page
    assert "@page{size:A4" in page and "@media print" in page
    assert "lab-&lt;a&gt;" in page and "lab-<a>" not in page
    for code in ("MB", "PEB", "Band", "BN"):
        assert f'id="class-{code}"' in page
    assert page.count("data:image/png;base64,") == 4 and "class=blank" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from outside
    assert "100.0%" in page and "not verified" in page and "at least 500" in page
    assert "id=apart" in page and "bare nucleus" in page
    text = rep.to_text(body)
    assert "MB" in text and "PEB" in text and "apart" in text and "not verified" in text


def test_cli_needs_only_an_api_url_and_a_token(monkeypatch) -> None:
    from click.testing import CliRunner

    from bmcell.cli.report import report

    for var in ("BMCELL_LABELAPI_URL", "BMCELL_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    runner = CliRunner()
    no_api = runner.invoke(report, ["lab-a", "s1", "--token", "t"])
    assert no_api.exit_code == 2 and "BMCELL_LABELAPI_URL" in no_api.output
    no_token = runner.invoke(report, ["lab-a", "s1", "--api", "https://x"])
    assert no_token.exit_code == 2 and "BMCELL_TOKEN" in no_token.output
    one_name = runner.invoke(report, ["s1", "--api", "https://x", "--token", "t"])
    assert one_name.exit_code == 2 and "LAB SPECIMEN" in one_name.output
