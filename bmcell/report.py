"""A specimen's differential count from the active model's predictions.

The pure part (:func:`differential`, :func:`largest_remainder`, :func:`me_ratio`,
:func:`render_html`) works on plain rows so it is tested without a database;
:func:`specimen_report` reads Postgres and is shared by ``bmcell report specimen``
and ``GET /v1/specimens/{lab}/{specimen}/report`` of the labeling API.

Counted: the specimen's cells except border cells (status ``excluded``). A cell
counts as the top-1 class of the active model version's prediction; a cell with no
prediction of that version is ``unclassified``, reported apart and left out of the
percentages, which are of classified cells and are rounded with the largest
remainder method so the printed values sum to exactly 100.0.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime

import psycopg

from bmcell.errors import InvalidArgument, NotFound
from bmcell.taxonomy import DEFAULT_TAXONOMY, Taxonomy

DEFAULT_MIN_CONFIDENCE = 0.6
DEFAULT_PER_CLASS = 12
THUMB_PX = 72


# --- the maths --------------------------------------------------------------------------


def largest_remainder(counts: Mapping[str, int], decimals: int = 1) -> dict[str, float]:
    """Percentages of ``counts`` rounded to ``decimals`` that sum to exactly 100.

    Each share is floored at the printed precision; the units left over go to the
    largest remainders (ties: larger count, then key order). All zero: all 0.0.
    """
    total = sum(counts.values())
    if any(v < 0 for v in counts.values()):
        raise ValueError("counts must not be negative")
    if total == 0:
        return dict.fromkeys(counts, 0.0)
    scale = 10**decimals
    units = 100 * scale
    exact = {k: v * units / total for k, v in counts.items()}
    floors = {k: math.floor(x) for k, x in exact.items()}
    left = units - sum(floors.values())
    order = sorted(counts, key=lambda k: (-(exact[k] - floors[k]), -counts[k]))
    for k in order[:left]:
        floors[k] += 1
    return {k: round(floors[k] / scale, decimals) for k in counts}


def me_ratio(counts: Mapping[str, int], taxonomy: Taxonomy) -> float | None:
    """Myeloid : erythroid ratio (myeloid count / erythroid count); None without erythroid."""
    myeloid = sum(counts.get(c, 0) for c in taxonomy.myeloid)
    erythroid = sum(counts.get(c, 0) for c in taxonomy.erythroid)
    return myeloid / erythroid if erythroid else None


def differential(
    rows: Iterable[Mapping],
    taxonomy: Taxonomy = DEFAULT_TAXONOMY,
    *,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
) -> dict:
    """Counts, percentages, M:E ratio and low-confidence cells from cell rows.

    A row has ``cell_id``, ``status`` and ``top1`` (class code or None when the cell
    has no prediction) and ``p1``. Rows with status ``excluded`` are skipped.
    """
    if not 0 <= min_confidence <= 1:
        raise InvalidArgument(f"must be within 0..1, got {min_confidence}", field="min_confidence")
    counts = dict.fromkeys(taxonomy.codes, 0)
    excluded = unclassified = 0
    low: list[dict] = []
    for r in rows:
        if r["status"] == "excluded":
            excluded += 1
            continue
        code = r.get("top1")
        if code is None:
            unclassified += 1
            continue
        if code not in counts:
            raise ValueError(f"cell {r['cell_id']}: class {code!r} is not in {taxonomy.name}")
        counts[code] += 1
        if r["p1"] < min_confidence:
            low.append({"cell_id": int(r["cell_id"]), "top1": code, "p1": round(float(r["p1"]), 4)})
    low.sort(key=lambda x: (x["p1"], x["cell_id"]))
    percent = largest_remainder(counts)
    classified = sum(counts.values())
    myeloid = sum(counts[c] for c in taxonomy.myeloid if c in counts)
    erythroid = sum(counts[c] for c in taxonomy.erythroid if c in counts)
    ratio = me_ratio(counts, taxonomy)
    notes = []
    if unclassified:
        notes.append(
            f"{unclassified} cell(s) have no prediction of the model version: counted as "
            "'unclassified' and left out of the percentages"
        )
    if excluded:
        notes.append(f"{excluded} border cell(s) excluded")
    if low:
        notes.append(f"{len(low)} cell(s) below confidence {min_confidence}: listed for review")
    return {
        "cells": {
            "counted": classified + unclassified,
            "classified": classified,
            "unclassified": unclassified,
            "excluded": excluded,
        },
        "classes": [
            {"code": c.code, "name": c.name, "count": counts[c.code], "percent": percent[c.code]}
            for c in taxonomy.classes
        ],
        "counts": {**counts, "unclassified": unclassified},
        "percentages": percent,
        "myeloid": myeloid,
        "erythroid": erythroid,
        "me_ratio": None if ratio is None else round(ratio, 3),
        "min_confidence": min_confidence,
        "low_confidence": low,
        "notes": notes,
    }


# --- from Postgres ----------------------------------------------------------------------


def find_specimen(
    conn: psycopg.Connection,
    specimen: str,
    lab: str | None = None,
    *,
    visible: Callable[[int], bool] | None = None,
) -> dict:
    """The specimen row (id, code, lab_id, lab, diagnosis, is_test); NotFound outside
    ``visible`` labs; without ``lab`` the code must be unique among visible labs."""
    rows = conn.execute(
        """SELECT s.id, s.code, s.lab_id, lab.code AS lab, s.diagnosis, s.is_test
             FROM specimens s JOIN labs lab ON lab.id = s.lab_id
            WHERE s.code = %s AND (%s::text IS NULL OR lab.code = %s) ORDER BY lab.code""",
        (specimen, lab, lab),
    ).fetchall()
    rows = [r for r in rows if visible is None or visible(r["lab_id"])]
    where = f" in lab {lab!r}" if lab else ""
    if not rows:
        raise NotFound(f"specimen {specimen!r} does not exist{where}", field="specimen")
    if len(rows) > 1:
        raise InvalidArgument(
            f"specimen {specimen!r} exists in labs {', '.join(r['lab'] for r in rows)}; "
            "name the lab",
            field="lab",
        )
    return dict(rows[0])


def active_model(conn: psycopg.Connection, model_name: str) -> dict | None:
    """The active version of ``model_name`` (version, taxonomy) or None."""
    row = conn.execute(
        """SELECT model_name, version, taxonomy, activated_at FROM model_versions
            WHERE model_name = %s AND state = 'active'""",
        (model_name,),
    ).fetchone()
    return dict(row) if row else None


def specimen_cells(conn: psycopg.Connection, specimen_id: int) -> list[dict]:
    return conn.execute(
        "SELECT id, status, crop_key FROM cells WHERE specimen_id = %s ORDER BY id",
        (specimen_id,),
    ).fetchall()


def unpredicted_cells(
    conn: psycopg.Connection, specimen_id: int, model_name: str, version: int
) -> list[int]:
    """Counted cells of the specimen without a prediction of ``version``."""
    rows = conn.execute(
        """SELECT c.id FROM cells c
            WHERE c.specimen_id = %s AND c.status <> 'excluded'
              AND NOT EXISTS (SELECT 1 FROM predictions p WHERE p.cell_id = c.id
                               AND p.model_name = %s AND p.model_version = %s)
            ORDER BY c.id""",
        (specimen_id, model_name, version),
    ).fetchall()
    return [r["id"] for r in rows]


def specimen_report(
    conn: psycopg.Connection,
    specimen: str,
    *,
    lab: str | None = None,
    model_name: str,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    visible: Callable[[int], bool] | None = None,
) -> dict:
    """The differential count of one specimen (JSON-ready) from the active model."""
    spec = find_specimen(conn, specimen, lab, visible=visible)
    model = active_model(conn, model_name)
    taxonomy = Taxonomy.from_json(model["taxonomy"]) if model else DEFAULT_TAXONOMY
    codes = taxonomy.codes
    rows = conn.execute(
        """SELECT c.id AS cell_id, c.status, c.crop_key, p.top1 AS top1_index, p.p1
             FROM cells c
             LEFT JOIN predictions p ON p.cell_id = c.id AND p.model_name = %s
                                    AND p.model_version = %s
            WHERE c.specimen_id = %s ORDER BY c.id""",
        (model_name, model["version"] if model else -1, spec["id"]),
    ).fetchall()
    cells = [
        {
            **r,
            "top1": None if r["top1_index"] is None else codes[r["top1_index"]],
        }
        for r in rows
    ]
    body = differential(cells, taxonomy, min_confidence=min_confidence)
    if model is None:
        body["notes"].insert(0, f"no active version of {model_name}: every cell is unclassified")
    return {
        "lab": spec["lab"],
        "specimen": spec["code"],
        "diagnosis": spec["diagnosis"],
        "is_test": spec["is_test"],
        "model": None if model is None else {"name": model_name, "version": model["version"]},
        "taxonomy": taxonomy.name,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **body,
        # Not part of the JSON answer: the gallery's source (see gallery_cells).
        "_cells": [
            {"cell_id": c["cell_id"], "top1": c["top1"], "p1": c["p1"], "crop_key": c["crop_key"]}
            for c in cells
            if c["status"] != "excluded" and c["top1"] is not None
        ],
    }


def public(report: Mapping) -> dict:
    """The report without its private keys (what JSON answers carry)."""
    return {k: v for k, v in report.items() if not k.startswith("_")}


def gallery_cells(report: Mapping, per_class: int = DEFAULT_PER_CLASS) -> dict[str, list[dict]]:
    """Up to ``per_class`` cells per class, most confident first."""
    out: dict[str, list[dict]] = {}
    for c in sorted(report.get("_cells", []), key=lambda c: (-c["p1"], c["cell_id"])):
        group = out.setdefault(c["top1"], [])
        if len(group) < per_class:
            group.append(c)
    return out


def thumbnail_data_uri(png: bytes, size: int = THUMB_PX) -> str:
    """A small inline PNG of a crop (``data:image/png;base64,...``)."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def thumbnails(
    report: Mapping, fetch: Callable[[str], bytes], per_class: int = DEFAULT_PER_CLASS
) -> dict[int, str]:
    """Inline thumbnails of the gallery's cells; ``fetch(crop_key)`` reads a crop."""
    out = {}
    for group in gallery_cells(report, per_class).values():
        for c in group:
            try:
                out[c["cell_id"]] = thumbnail_data_uri(fetch(c["crop_key"]))
            except Exception:  # noqa: BLE001 - a missing crop leaves a blank tile
                continue
    return out


# --- HTML -------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px}
.meta{color:#555}table{border-collapse:collapse;margin-top:8px}
th,td{padding:3px 10px;border-bottom:1px solid #ddd;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.zero td{color:#aaa}tfoot td{font-weight:600;border-top:2px solid #999}
.bar{display:inline-block;height:10px;background:#7a5aa6;vertical-align:middle}
.notes li{color:#744}.gallery{display:flex;flex-wrap:wrap;gap:4px}
figure{margin:0;text-align:center;font-size:11px;color:#555}
figure img{display:block;width:72px;height:72px;object-fit:contain;background:#fff;
border:1px solid #ccc}
.blank{width:72px;height:72px;border:1px dashed #ccc}
"""


def _fmt_ratio(r: float | None) -> str:
    return "n/a (no erythroid cells)" if r is None else f"{r:.2f} : 1"


def render_html(
    report: Mapping,
    thumbs: Mapping[int, str] | None = None,
    *,
    per_class: int = DEFAULT_PER_CLASS,
    low_limit: int = 200,
) -> str:
    """A self-contained page (inline CSS, thumbnails as data URIs): table and gallery."""
    e = html.escape
    thumbs = thumbs or {}
    model = report.get("model")
    cells = report["cells"]
    rows = []
    for c in report["classes"]:
        pct = c["percent"]
        rows.append(
            f'<tr class="{"zero" if not c["count"] else ""}"><td>{e(c["code"])}</td>'
            f"<td>{e(c['name'])}</td><td class=n>{c['count']}</td>"
            f'<td class=n>{pct:.1f}%</td><td><span class=bar style="width:{pct * 3:.0f}px">'
            "</span></td></tr>"
        )
    total_pct = sum(c["percent"] for c in report["classes"])
    rows_html = "\n".join(rows)
    gallery = []
    for code, group in gallery_cells(report, per_class).items():
        tiles = "".join(
            f'<figure><img src="{thumbs[c["cell_id"]]}" alt="cell {c["cell_id"]}">'
            f"{c['cell_id']} · {c['p1']:.2f}</figure>"
            if c["cell_id"] in thumbs
            else f"<figure><div class=blank></div>{c['cell_id']} · {c['p1']:.2f}</figure>"
            for c in group
        )
        gallery.append(f'<h3 id="class-{e(code)}">{e(code)}</h3><div class=gallery>{tiles}</div>')
    low = report["low_confidence"]
    low_rows = "".join(
        f"<tr><td>{x['cell_id']}</td><td>{e(x['top1'])}</td><td class=n>{x['p1']:.3f}</td></tr>"
        for x in low[:low_limit]
    )
    more = f"<p>and {len(low) - low_limit} more</p>" if len(low) > low_limit else ""
    notes = "".join(f"<li>{e(n)}</li>" for n in report["notes"])
    model_txt = f"{e(model['name'])} version {model['version']}" if model else "none active"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Differential count: {e(report["lab"])} / {e(report["specimen"])}</title>
<style>{_CSS}</style></head><body>
<h1>Differential count: {e(report["specimen"])}</h1>
<div class=meta>lab {e(report["lab"])} · diagnosis {e(report["diagnosis"] or "-")}
 · model {model_txt} · generated {e(report["generated_at"])}</div>
<p>Cells counted: <b>{cells["counted"]}</b> (classified {cells["classified"]},
unclassified {cells["unclassified"]}; border cells excluded {cells["excluded"]}).
Myeloid : erythroid = <b>{_fmt_ratio(report["me_ratio"])}</b>
({report["myeloid"]} : {report["erythroid"]}).</p>
<ul class=notes>{notes}</ul>
<table><thead><tr><th>class</th><th>name</th><th>count</th><th>%</th><th></th></tr></thead>
<tbody>
{rows_html}
</tbody><tfoot><tr><td></td><td>classified</td><td class=n>{cells["classified"]}</td>
<td class=n>{total_pct:.1f}%</td><td></td></tr>
<tr><td></td><td>unclassified (not in %)</td><td class=n>{cells["unclassified"]}</td>
<td></td><td></td></tr></tfoot></table>
<h2>Below confidence {report["min_confidence"]}: for review ({len(low)})</h2>
<table><thead><tr><th>cell</th><th>top-1</th><th>p1</th></tr></thead>
<tbody>{low_rows}</tbody></table>{more}
<h2>Gallery (up to {per_class} per class, most confident first)</h2>
{"".join(gallery) or "<p>no classified cells</p>"}
</body></html>
"""


def to_text(report: Mapping) -> str:
    """A plain-text table for the terminal."""
    lines = [
        f"{report['lab']}/{report['specimen']}  model "
        + (f"{report['model']['name']} v{report['model']['version']}" if report["model"] else "-"),
    ]
    for c in report["classes"]:
        if c["count"]:
            lines.append(f"  {c['code']:<6}{c['count']:>7}{c['percent']:>8.1f}%")
    cells = report["cells"]
    lines.append(
        f"  classified {cells['classified']}, unclassified {cells['unclassified']}, "
        f"excluded {cells['excluded']}; M:E {_fmt_ratio(report['me_ratio'])}; "
        f"low confidence {len(report['low_confidence'])}"
    )
    lines += [f"  note: {n}" for n in report["notes"]]
    return "\n".join(lines)
