"""A specimen's differential count: reviewed labels first, then the active model.

The pure part (:func:`differential`, :func:`largest_remainder`, :func:`me_ratio`,
:func:`state_digest`, :func:`render_html`) works on plain rows so it is tested
without a database; the Postgres part (:func:`specimen_report`, the sign-offs of
:func:`record_verification`) is what ``GET /v1/specimens/{lab}/{specimen}/report``
of the labeling API (services/labelapi/reports.py) answers with, and what
``bmcell report`` fetches with a token.

How a cell counts (ICSH's differential count):

- border cells (status ``excluded``) are not counted at all;
- a cell with a reviewer's label counts as that label (``reviewed``), any other as
  the top-1 class of the active model version's prediction (``predicted``); a
  self-training pseudo-label (source ``st``) is no reviewer's and does not count;
- bare nuclei and artifacts (``Taxonomy.not_counted``) are not nucleated cells:
  they are reported apart and left out of the percentages, which are of the
  nucleated cells counted and are rounded with the largest remainder method so the
  printed values sum to exactly 100.0; lineage subtotals and the blast percentage
  are sums of those printed values;
- fewer than 500 nucleated cells earn a warning (ICSH asks for at least 500).

A sign-off (``report_verifications``) keeps the digest of the counted state: every
counted cell's class and source. When the digest of today's state differs, the
report says the sign-off is stale.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime

import psycopg
from psycopg.types.json import Jsonb

from bmcell import audit
from bmcell.errors import Conflict, InvalidArgument, NotFound
from bmcell.taxonomy import DEFAULT_TAXONOMY, Taxonomy

DEFAULT_MIN_CONFIDENCE = 0.6
DEFAULT_PER_CLASS = 12
MIN_CELLS = 500  # ICSH: a marrow differential counts at least 500 nucleated cells
THUMB_PX = 72
# Label sources that are a reviewer's answer (``st`` is a model's pseudo-label).
REVIEWED_SOURCES = ("initial", "cst", "al", "test", "validation", "random", "import")


class NoActiveModel(Conflict):
    """No model version passed the promotion gate, so no cell can be predicted."""


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


def report_taxonomy(taxonomy: Taxonomy) -> Taxonomy:
    """``taxonomy`` with the study's blast and not-counted classes when it was stored
    before taxonomies carried them (model versions registered before issue 14)."""
    if taxonomy.not_counted or taxonomy.blasts or taxonomy.codes != DEFAULT_TAXONOMY.codes:
        return taxonomy
    return DEFAULT_TAXONOMY


def counted_class(row: Mapping) -> tuple[str | None, str | None]:
    """(class, source) a cell row counts as: its reviewer's label, else its prediction."""
    if row.get("label"):
        return row["label"], "reviewed"
    if row.get("top1"):
        return row["top1"], "predicted"
    return None, None


def state_digest(rows: Iterable[Mapping]) -> str:
    """sha256 of what the count is made of: each counted cell's class and source
    (border cells and their order do not matter)."""
    state = sorted(
        [int(r["cell_id"]), *counted_class(r)] for r in rows if r["status"] != "excluded"
    )
    return hashlib.sha256(json.dumps(state, separators=(",", ":")).encode()).hexdigest()


def _split(taxonomy: Taxonomy, code: str, tally: Mapping[str, Mapping[str, int]]) -> dict:
    t = tally[code]
    return {
        "code": code,
        "name": taxonomy.classes[taxonomy.index(code)].name,
        "count": t["reviewed"] + t["predicted"],
        "reviewed": t["reviewed"],
        "predicted": t["predicted"],
    }


def differential(
    rows: Iterable[Mapping],
    taxonomy: Taxonomy = DEFAULT_TAXONOMY,
    *,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
) -> dict:
    """Counts (reviewed / predicted), percentages, lineages, blasts, M:E ratio,
    warnings and low-confidence cells from cell rows.

    A row has ``cell_id``, ``status``, ``label`` (a reviewer's class or None),
    ``top1`` (the predicted class or None) and ``p1``. Rows with status
    ``excluded`` (border cells) are skipped.
    """
    if not 0 <= min_confidence <= 1:
        raise InvalidArgument(f"must be within 0..1, got {min_confidence}", field="min_confidence")
    rows = list(rows)
    taxonomy = report_taxonomy(taxonomy)
    tally = {c: {"reviewed": 0, "predicted": 0} for c in taxonomy.codes}
    border = unclassified = 0
    low: list[dict] = []
    for r in rows:
        if r["status"] == "excluded":
            border += 1
            continue
        code, source = counted_class(r)
        if code is None:
            unclassified += 1
            continue
        if code not in tally:
            raise ValueError(f"cell {r['cell_id']}: class {code!r} is not in {taxonomy.name}")
        tally[code][source] += 1
        if source == "predicted" and r["p1"] < min_confidence:
            low.append({"cell_id": int(r["cell_id"]), "top1": code, "p1": round(float(r["p1"]), 4)})
    low.sort(key=lambda x: (x["p1"], x["cell_id"]))

    apart_codes = [c for c in taxonomy.codes if c in taxonomy.not_counted]
    counted_codes = [c for c in taxonomy.codes if c not in taxonomy.not_counted]
    counts = {c: tally[c]["reviewed"] + tally[c]["predicted"] for c in taxonomy.codes}
    nucleated = sum(counts[c] for c in counted_codes)
    percent = largest_remainder({c: counts[c] for c in counted_codes})

    def subtotal(name: str, codes: Iterable[str]) -> dict:
        codes = [c for c in codes if c in percent]
        return {
            "name": name,
            "codes": codes,
            "count": sum(counts[c] for c in codes),
            "percent": round(sum(percent[c] for c in codes), 1),
        }

    lineages = [
        subtotal("myeloid", taxonomy.myeloid),
        subtotal("erythroid", taxonomy.erythroid),
        subtotal(
            "other",
            [c for c in counted_codes if c not in taxonomy.myeloid + taxonomy.erythroid],
        ),
    ]
    blasts = subtotal("blasts", taxonomy.blasts)
    ratio = me_ratio(counts, taxonomy)
    reviewed = sum(t["reviewed"] for t in tally.values())
    predicted = sum(t["predicted"] for t in tally.values())

    warnings = []
    if nucleated < MIN_CELLS:
        warnings.append(
            f"only {nucleated} nucleated cell(s) counted: a differential count needs at "
            f"least {MIN_CELLS} (ICSH); read the percentages with care"
        )
    if unclassified:
        warnings.append(
            f"{unclassified} cell(s) have neither a reviewer's label nor a prediction of "
            "the model version: left out of the count"
        )
    notes = []
    if apart_codes:
        apart_n = sum(counts[c] for c in apart_codes)
        notes.append(
            f"{apart_n} {' / '.join(apart_codes)} cell(s) reported apart, not in the percentages"
        )
    if border:
        notes.append(f"{border} border cell(s) not counted")
    if low:
        notes.append(f"{len(low)} predicted cell(s) below confidence {min_confidence}: listed")
    return {
        "cells": {
            "total": len(rows),
            "border": border,
            "nucleated": nucleated,
            "apart": sum(counts[c] for c in apart_codes),
            "unclassified": unclassified,
            "reviewed": reviewed,
            "predicted": predicted,
        },
        "classes": [{**_split(taxonomy, c, tally), "percent": percent[c]} for c in counted_codes],
        "apart": [_split(taxonomy, c, tally) for c in apart_codes],
        "percentages": percent,
        "lineages": lineages,
        "blasts": {
            "codes": blasts["codes"],
            "count": blasts["count"],
            "percent": blasts["percent"],
        },
        "myeloid": lineages[0]["count"],
        "erythroid": lineages[1]["count"],
        "me_ratio": None if ratio is None else round(ratio, 3),
        "min_cells": MIN_CELLS,
        "min_confidence": min_confidence,
        "low_confidence": low,
        "warnings": warnings,
        "notes": notes,
        "digest": state_digest(rows),
    }


def verification_view(latest: Mapping | None, digest: str) -> dict:
    """What a report says of its sign-off: by whom and when, and whether the counted
    state has changed since (``stale``)."""
    if latest is None:
        return {"verified": False, "text": "not verified"}
    at = latest["verified_at"].astimezone(UTC).isoformat(timespec="seconds")
    stale = latest["digest"] != digest
    text = f"verified by {latest['verified_by']} at {at}"
    if stale:
        text += " (stale: labels, predictions or cells changed since)"
    return {
        "verified": True,
        "by": latest["verified_by"],
        "at": at,
        "model_version": latest["model_version"],
        "digest": latest["digest"],
        "stale": stale,
        "text": text,
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


def require_model(conn: psycopg.Connection, model_name: str) -> dict:
    """The active version; NoActiveModel (HTTP 409) before any passed the gate."""
    model = active_model(conn, model_name)
    if model is None:
        raise NoActiveModel(
            f"no model passed the gate yet: {model_name} has no active version, so the "
            "specimen's cells cannot be predicted; run the bootstrap round first",
            field="model",
        )
    return model


def unpredicted_cells(
    conn: psycopg.Connection, specimen_id: int, model_name: str, version: int
) -> list[int]:
    """Counted cells of the specimen with neither a reviewer's label nor a prediction
    of ``version``: what must be predicted before the report is complete."""
    rows = conn.execute(
        """SELECT c.id FROM cells c
            WHERE c.specimen_id = %s AND c.status <> 'excluded'
              AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.cell_id = c.id
                               AND l.source = ANY(%s))
              AND NOT EXISTS (SELECT 1 FROM predictions p WHERE p.cell_id = c.id
                               AND p.model_name = %s AND p.model_version = %s)
            ORDER BY c.id""",
        (specimen_id, list(REVIEWED_SOURCES), model_name, version),
    ).fetchall()
    return [r["id"] for r in rows]


def cell_rows(
    conn: psycopg.Connection, specimen_id: int, model_name: str, model: Mapping | None
) -> tuple[Taxonomy, list[dict]]:
    """The taxonomy and the rows :func:`differential` counts (with crop keys)."""
    taxonomy = report_taxonomy(Taxonomy.from_json(model["taxonomy"]) if model else DEFAULT_TAXONOMY)
    codes = taxonomy.codes
    rows = conn.execute(
        """SELECT c.id AS cell_id, c.status, c.crop_key, l.class_code AS label,
                  p.top1 AS top1_index, p.p1
             FROM cells c
             LEFT JOIN labels l ON l.cell_id = c.id AND l.source = ANY(%s)
             LEFT JOIN predictions p ON p.cell_id = c.id AND p.model_name = %s
                                    AND p.model_version = %s
            WHERE c.specimen_id = %s ORDER BY c.id""",
        (list(REVIEWED_SOURCES), model_name, model["version"] if model else -1, specimen_id),
    ).fetchall()
    return taxonomy, [
        {**r, "top1": None if r["top1_index"] is None else codes[r["top1_index"]]} for r in rows
    ]


def latest_verification(conn: psycopg.Connection, specimen_id: int) -> dict | None:
    return conn.execute(
        """SELECT v.id, u.name AS verified_by, v.verified_at, v.model_version, v.digest
             FROM report_verifications v JOIN users u ON u.id = v.verified_by
            WHERE v.specimen_id = %s ORDER BY v.verified_at DESC, v.id DESC LIMIT 1""",
        (specimen_id,),
    ).fetchone()


def specimen_report(
    conn: psycopg.Connection,
    specimen: str,
    *,
    lab: str | None = None,
    model_name: str,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    visible: Callable[[int], bool] | None = None,
) -> dict:
    """The differential count of one specimen (JSON-ready). Without an active model
    version it is refused (NoActiveModel) unless a reviewer labelled every cell."""
    spec = find_specimen(conn, specimen, lab, visible=visible)
    model = active_model(conn, model_name)
    taxonomy, cells = cell_rows(conn, spec["id"], model_name, model)
    if model is None and any(r["status"] != "excluded" and not r["label"] for r in cells):
        require_model(conn, model_name)
    body = differential(cells, taxonomy, min_confidence=min_confidence)
    return {
        "lab": spec["lab"],
        "specimen": spec["code"],
        "specimen_id": spec["id"],
        "diagnosis": spec["diagnosis"],
        "is_test": spec["is_test"],
        "model": None if model is None else {"name": model_name, "version": model["version"]},
        "taxonomy": taxonomy.name,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **body,
        "verification": verification_view(latest_verification(conn, spec["id"]), body["digest"]),
        # Not part of the JSON answer: the gallery's source (see gallery_cells).
        "_cells": [
            {
                "cell_id": c["cell_id"],
                "class": counted_class(c)[0],
                "reviewed": bool(c["label"]),
                "p1": 1.0 if c["label"] else c["p1"],
                "crop_key": c["crop_key"],
            }
            for c in cells
            if c["status"] != "excluded" and counted_class(c)[0] is not None
        ],
    }


def record_verification(
    conn: psycopg.Connection,
    report: Mapping,
    *,
    user_id: int,
    seen_digest: str | None = None,
) -> dict:
    """Sign ``report`` off as the caller (a reviewer or admin), audited. ``seen_digest``:
    the digest of the report the signer read; refused (Conflict) when it changed since."""
    if seen_digest is not None and seen_digest != report["digest"]:
        raise Conflict(
            "the report changed since you read it (its digest differs); read it again "
            "and sign off what it shows now",
            field="digest",
        )
    if report["cells"]["unclassified"]:
        raise Conflict(
            f"{report['cells']['unclassified']} cell(s) are not classified yet; predict them "
            "before signing the report off",
            field="specimen",
        )
    counts = {
        "classes": {c["code"]: c["count"] for c in report["classes"]},
        "apart": {c["code"]: c["count"] for c in report["apart"]},
        "reviewed": report["cells"]["reviewed"],
        "predicted": report["cells"]["predicted"],
    }
    model = report["model"] or {"name": "", "version": 0}
    row = conn.execute(
        """INSERT INTO report_verifications
               (specimen_id, verified_by, model_name, model_version, digest, counts)
           VALUES (%s, %s, %s, %s, %s, %s) RETURNING id, verified_at""",
        (
            report["specimen_id"],
            user_id,
            model["name"],
            model["version"],
            report["digest"],
            Jsonb(counts),
        ),
    ).fetchone()
    audit.record(
        conn,
        "report.verify",
        "specimen",
        report["specimen_id"],
        {"lab": report["lab"], "specimen": report["specimen"], "verification": row["id"]},
        after={"digest": report["digest"], "model_version": model["version"], **counts},
    )
    return dict(row)


def public(report: Mapping) -> dict:
    """The report without its private keys (what JSON answers carry)."""
    return {k: v for k, v in report.items() if not k.startswith("_")}


def gallery_cells(report: Mapping, per_class: int = DEFAULT_PER_CLASS) -> dict[str, list[dict]]:
    """Up to ``per_class`` cells per class: reviewed ones, then the most confident."""
    out: dict[str, list[dict]] = {}
    for c in sorted(report.get("_cells", []), key=lambda c: (-c["p1"], c["cell_id"])):
        group = out.setdefault(c["class"], [])
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
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:20px 0 6px}
h3{font-size:14px;margin:12px 0 4px}
.meta{color:#555}table{border-collapse:collapse;margin-top:6px;width:100%;max-width:760px}
th,td{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
tr.zero td{color:#aaa}tfoot td{font-weight:600;border-top:2px solid #999}
.bar{display:inline-block;height:10px;background:#7a5aa6;vertical-align:middle}
.warn{border:2px solid #b33;background:#fdecec;padding:6px 10px;margin:8px 0}
.signoff{border:1px solid #999;padding:6px 10px;margin:8px 0}
.signoff.stale{border-color:#b33;color:#b33}
.notes li{color:#744}.gallery{display:flex;flex-wrap:wrap;gap:4px}
figure{margin:0;text-align:center;font-size:11px;color:#555}
figure img{display:block;width:72px;height:72px;object-fit:contain;background:#fff;
border:1px solid #ccc}
.blank{width:72px;height:72px;border:1px dashed #ccc}
@page{size:A4;margin:15mm 12mm}
@media print{
body{margin:0;max-width:none;font-size:10pt}
table{max-width:none;page-break-inside:auto}tr,figure{page-break-inside:avoid}
thead{display:table-header-group}tfoot{display:table-footer-group}
h2,h3{page-break-after:avoid}.bar{print-color-adjust:exact;-webkit-print-color-adjust:exact}
.gallery-section{page-break-before:always}
figure img,.blank{width:18mm;height:18mm}
}
"""


def _fmt_ratio(r: float | None) -> str:
    return "n/a (no erythroid cells)" if r is None else f"{r:.2f} : 1"


def _tile_caption(cell: Mapping) -> str:
    return "reviewed" if cell["reviewed"] else f"{cell['p1']:.2f}"


def render_html(
    report: Mapping,
    thumbs: Mapping[int, str] | None = None,
    *,
    per_class: int = DEFAULT_PER_CLASS,
    low_limit: int = 200,
) -> str:
    """A self-contained page (inline CSS, thumbnails as data URIs) that prints on A4:
    sign-off, warnings, the count, lineages, cells apart, low-confidence cells, gallery."""
    e = html.escape
    thumbs = thumbs or {}
    model = report.get("model")
    cells = report["cells"]

    def class_row(c: Mapping, with_percent: bool) -> str:
        pct = c.get("percent", 0.0)
        cols = (
            f'<td class=n>{pct:.1f}%</td><td><span class=bar style="width:{pct * 3:.0f}px">'
            "</span></td>"
            if with_percent
            else ""
        )
        return (
            f'<tr class="{"zero" if not c["count"] else ""}"><td>{e(c["code"])}</td>'
            f"<td>{e(c['name'])}</td><td class=n>{c['count']}</td>"
            f"<td class=n>{c['reviewed']}</td><td class=n>{c['predicted']}</td>{cols}</tr>"
        )

    rows_html = "\n".join(class_row(c, True) for c in report["classes"])
    apart_html = "\n".join(class_row(c, False) for c in report["apart"])
    total_pct = sum(c["percent"] for c in report["classes"])
    lineage_rows = "".join(
        f"<tr><td>{e(x['name'])}</td><td>{e(', '.join(x['codes']))}</td>"
        f"<td class=n>{x['count']}</td><td class=n>{x['percent']:.1f}%</td></tr>"
        for x in report["lineages"]
    )
    b = report["blasts"]
    gallery = []
    for code, group in gallery_cells(report, per_class).items():
        tiles = "".join(
            (
                f'<figure><img src="{thumbs[c["cell_id"]]}" alt="cell {c["cell_id"]}">'
                if c["cell_id"] in thumbs
                else "<figure><div class=blank></div>"
            )
            + f"{c['cell_id']} · {_tile_caption(c)}</figure>"
            for c in group
        )
        gallery.append(f'<h3 id="class-{e(code)}">{e(code)}</h3><div class=gallery>{tiles}</div>')
    low = report["low_confidence"]
    low_rows = "".join(
        f"<tr><td>{x['cell_id']}</td><td>{e(x['top1'])}</td><td class=n>{x['p1']:.3f}</td></tr>"
        for x in low[:low_limit]
    )
    more = f"<p>and {len(low) - low_limit} more</p>" if len(low) > low_limit else ""
    warnings = "".join(f"<div class=warn>{e(w)}</div>" for w in report["warnings"])
    notes = "".join(f"<li>{e(n)}</li>" for n in report["notes"])
    v = report["verification"]
    signoff_class = "signoff stale" if v.get("stale") else "signoff"
    model_txt = f"{e(model['name'])} version {model['version']}" if model else "none active"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Differential count: {e(report["lab"])} / {e(report["specimen"])}</title>
<style>{_CSS}</style></head><body>
<h1>Differential count: {e(report["specimen"])}</h1>
<div class=meta>lab {e(report["lab"])} · diagnosis {e(report["diagnosis"] or "-")}
 · model {model_txt} · generated {e(report["generated_at"])}</div>
<div class="{signoff_class}" id=verification>{e(v["text"])}</div>
{warnings}
<p>Nucleated cells counted: <b id=nucleated>{cells["nucleated"]}</b>
(reviewed {cells["reviewed"]}, predicted {cells["predicted"]} in all classes;
{cells["apart"]} bare nuclei / artifacts apart; {cells["border"]} border cells not counted).
Blasts: <b id=blasts>{b["percent"]:.1f}%</b> ({b["count"]}).
Myeloid : erythroid = <b id=me-ratio>{_fmt_ratio(report["me_ratio"])}</b>
({report["myeloid"]} : {report["erythroid"]}).</p>
<table id=differential><thead><tr><th>class</th><th>name</th><th class=n>count</th>
<th class=n>reviewed</th><th class=n>predicted</th><th class=n>%</th><th></th></tr></thead>
<tbody>
{rows_html}
</tbody><tfoot><tr><td></td><td>nucleated cells</td><td class=n>{cells["nucleated"]}</td>
<td></td><td></td><td class=n>{total_pct:.1f}%</td><td></td></tr></tfoot></table>
<h2>Lineages</h2>
<table id=lineages><thead><tr><th>lineage</th><th>classes</th><th class=n>count</th>
<th class=n>%</th></tr></thead><tbody>{lineage_rows}</tbody></table>
<h2>Reported apart (not in the percentages)</h2>
<table id=apart><thead><tr><th>class</th><th>name</th><th class=n>count</th>
<th class=n>reviewed</th><th class=n>predicted</th></tr></thead><tbody>
{apart_html}
</tbody></table>
<ul class=notes>{notes}</ul>
<h2>Predicted below confidence {report["min_confidence"]} ({len(low)})</h2>
<table><thead><tr><th>cell</th><th>top-1</th><th class=n>p1</th></tr></thead>
<tbody>{low_rows}</tbody></table>{more}
<section class=gallery-section>
<h2>Gallery (up to {per_class} per class: reviewed first, then most confident)</h2>
{"".join(gallery) or "<p>no classified cells</p>"}
</section>
</body></html>
"""


def to_text(report: Mapping) -> str:
    """A plain-text table for the terminal."""
    model = report["model"]
    lines = [
        f"{report['lab']}/{report['specimen']}  model "
        + (f"{model['name']} v{model['version']}" if model else "-")
        + f"  {report['verification']['text']}",
        f"  {'class':<6}{'count':>7}{'reviewed':>10}{'predicted':>11}{'%':>8}",
    ]
    for c in report["classes"]:
        if c["count"]:
            lines.append(
                f"  {c['code']:<6}{c['count']:>7}{c['reviewed']:>10}{c['predicted']:>11}"
                f"{c['percent']:>7.1f}%"
            )
    for c in report["apart"]:
        lines.append(
            f"  {c['code']:<6}{c['count']:>7}{c['reviewed']:>10}{c['predicted']:>11}   apart"
        )
    cells = report["cells"]
    lineages = ", ".join(f"{x['name']} {x['percent']:.1f}%" for x in report["lineages"])
    lines.append(
        f"  nucleated {cells['nucleated']}; {lineages}; blasts {report['blasts']['percent']:.1f}%;"
        f" M:E {_fmt_ratio(report['me_ratio'])}; low confidence {len(report['low_confidence'])}"
    )
    lines += [f"  warning: {w}" for w in report["warnings"]]
    lines += [f"  note: {n}" for n in report["notes"]]
    return "\n".join(lines)
