"""Exports with images: an ImageFolder zip of crops, or COCO JSON of the fields.

Both stream: rows come from a server-side cursor, each object is read from storage
as its entry is written, and the zip goes out in chunks as it grows (``zipfile``
writes data descriptors to a stream it cannot seek), so an export never sits whole
in memory.

- ``imagefolder``: ``<code>/<cell_id>.png`` per labelled cell (its stored crop, as the
  classifier sees it) and ``manifest.csv``: cell id, lab, specimen, class, label
  source, reviewers, the model version that proposed it, the crop's file. Importing
  the zip's folders (``bmcell import --format imagefolder``) gives the same labels.
- ``coco``: ``annotations.json`` (COCO instances: images = the fields of labelled
  cells, one annotation per labelled cell with its bounding box and its mask as
  uncompressed RLE in field coordinates, categories = the taxonomy) and
  ``images/<field_id>.png``. Imported crops have no field and are left out of it.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from collections.abc import Iterable, Iterator

import numpy as np
import psycopg
from PIL import Image

from bmcell.auth import Principal
from bmcell.storage import ObjectStore
from bmcell.taxonomy import Taxonomy
from services.labelapi import labels

MANIFEST_COLUMNS = (
    "cell_id",
    "lab",
    "specimen",
    "class_code",
    "source",
    "reviewers",
    "model_version",
    "round",
    "file",
)


class _Chunks:
    """A write-only stream that hands on what was written (zipfile needs only write)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out = b"".join(self.parts)
        self.parts.clear()
        return out


def export_rows(
    conn: psycopg.Connection,
    principal: Principal,
    *,
    round_number: int | None,
    lab_ids: list[int] | None,
    class_code: str | None,
    limit: int,
) -> Iterator[dict]:
    """Labelled cells the caller may see with what an export with images needs."""
    params = labels.export_params(
        principal, round_number=round_number, lab_ids=lab_ids, class_code=class_code, limit=limit
    )
    with conn.cursor(name="labels_export_images") as cur:
        cur.itersize = 500
        cur.execute(
            f"""SELECT l.cell_id, lab.code AS lab, s.code AS specimen, l.class_code, l.source,
                      r.number AS round, r.model_in AS model_version,
                      COALESCE((SELECT string_agg(u2.name, ';' ORDER BY u2.name)
                                  FROM reviews rv JOIN users u2 ON u2.id = rv.reviewer_id
                                 WHERE rv.task_id = l.task_id),
                               u.name, '') AS reviewers,
                      c.crop_key, c.mask_key, c.field_id, c.x0, c.y0, c.x1, c.y1,
                      f.object_key AS field_key, f.width AS field_width,
                      f.height AS field_height
                 FROM labels l
                 JOIN cells c ON c.id = l.cell_id
                 JOIN labs lab ON lab.id = c.lab_id
                 JOIN specimens s ON s.id = c.specimen_id
                 LEFT JOIN field_images f ON f.id = c.field_id
                 LEFT JOIN rounds r ON r.id = l.round_id
                 LEFT JOIN users u ON u.id = l.labelled_by
                {labels.EXPORT_FILTER}
                ORDER BY c.field_id NULLS LAST, l.cell_id
                LIMIT %(limit)s""",
            params,
        )
        yield from cur


def imagefolder_zip(rows: Iterable[dict], store: ObjectStore) -> Iterator[bytes]:
    out = _Chunks()
    manifest = io.StringIO()
    writer = csv.DictWriter(manifest, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        for row in rows:
            name = f"{row['class_code']}/{row['cell_id']}.png"
            zf.writestr(name, store.get(row["crop_key"]))  # PNGs: deflate gains nothing
            writer.writerow({k: row.get(k) for k in MANIFEST_COLUMNS} | {"file": name})
            yield out.take()
        zf.writestr("manifest.csv", manifest.getvalue(), compress_type=zipfile.ZIP_DEFLATED)
    yield out.take()


def coco_zip(rows: Iterable[dict], store: ObjectStore, taxonomy: Taxonomy) -> Iterator[bytes]:
    categories = [
        {"id": i + 1, "name": c.code, "supercategory": "cell", "description": c.name}
        for i, c in enumerate(taxonomy.classes)
    ]
    category_of = {c["name"]: c["id"] for c in categories}
    out = _Chunks()
    images: list[dict] = []
    annotations: list[dict] = []
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        current: int | None = None
        for row in rows:
            if row["field_id"] is None or row["class_code"] not in category_of:
                continue
            fid = int(row["field_id"])
            if fid != current:
                current = fid
                name = f"images/{fid}.png"
                zf.writestr(name, store.get(row["field_key"]))
                images.append(
                    {
                        "id": fid,
                        "file_name": name,
                        "width": row["field_width"],
                        "height": row["field_height"],
                    }
                )
                yield out.take()
            mask = _field_mask(store.get(row["mask_key"]), row)
            x0, y0, x1, y1 = row["x0"], row["y0"], row["x1"], row["y1"]
            annotations.append(
                {
                    "id": int(row["cell_id"]),
                    "image_id": fid,
                    "category_id": category_of[row["class_code"]],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": int(mask.sum()),
                    "iscrowd": 0,
                    "segmentation": rle(mask),
                    "attributes": {
                        "lab": row["lab"],
                        "specimen": row["specimen"],
                        "source": row["source"],
                        "reviewers": row["reviewers"],
                        "model_version": row["model_version"],
                    },
                }
            )
        doc = {
            "info": {"description": "bmcell labelled cells", "version": "1"},
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        zf.writestr("annotations.json", json.dumps(doc), compress_type=zipfile.ZIP_DEFLATED)
    yield out.take()


def _field_mask(mask_png: bytes, row: dict) -> np.ndarray:
    """The cell's mask in field coordinates (bool, field-sized). The stored mask is the
    crop window centred on the cell; only the part inside the cell's box is kept, so a
    neighbour never leaks in."""
    crop = np.asarray(Image.open(io.BytesIO(mask_png))) > 0
    h, w = int(row["field_height"]), int(row["field_width"])
    x0, y0, x1, y1 = row["x0"], row["y0"], row["x1"], row["y1"]
    # The crop window is centred on the cell and its foreground is that cell only, so
    # the foreground's top-left corner is the box's.
    ys, xs = np.nonzero(crop)
    out = np.zeros((h, w), dtype=bool)
    if len(xs) == 0:
        return out
    ox = x0 - int(xs.min())
    oy = y0 - int(ys.min())
    fy, fx = ys + oy, xs + ox
    keep = (fx >= x0) & (fx < x1) & (fy >= y0) & (fy < y1)
    out[fy[keep], fx[keep]] = True
    return out


def rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a bool mask: run lengths in column-major order,
    starting with a run of zeros."""
    flat = np.asfortranarray(mask).reshape(-1, order="F").astype(np.uint8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}
