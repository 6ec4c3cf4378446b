"""One labelled crop imported into a specimen: check, fit, store objects, then rows.

The crop is decoded through :func:`bmcell.images.decode_rgb` (bytes, format, pixel
and mode limits, truncation), fitted into the crop frame (:mod:`bmcell.datasets`)
and stored as the segmenter stores crops: a metadata-free PNG and its mask under
content keys (``cells/ab/<sha256>.png``, ``.mask.png``), then in one transaction the
cell row (no field), its thumb, its label (source ``import``, the importer as
``labelled_by``) and one ``cell.import`` audit row.

Idempotent on (specimen, sha256 of the bytes sent): the same file again answers
``duplicate`` and writes nothing. A refused file writes nothing at all: every check
runs before the first object is written. Objects are written before the rows under
the same per-object advisory locks as the segmenter's (:func:`bmcell.db.object_lock_key`),
and when the transaction fails the objects this call created are deleted again.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from psycopg import Connection

from bmcell import audit, images, preprocess, thumbs
from bmcell.auth import Principal, require_upload
from bmcell.datasets import Fitted, fit_into_frame
from bmcell.db import Database, advisory_locks, lock_key, object_lock_key
from bmcell.errors import BmcellError, FailedPrecondition
from bmcell.network import DEFAULT_INPUT_SIZE
from bmcell.storage import ObjectStore, content_key, sha256_hex
from bmcell.taxonomy import Taxonomy
from services.labelapi import labels
from services.segmenter import cells as repo


@dataclass(frozen=True)
class Imported:
    cell_id: int
    sha256: str
    duplicate: bool
    class_code: str


def import_crop(
    db: Database,
    conn: Connection,
    store: ObjectStore,
    principal: Principal,
    taxonomy: Taxonomy,
    *,
    lab: str,
    specimen: str,
    class_code: str,
    data: bytes,
    limits: images.Limits,
    crop_size: int,
) -> Imported:
    """Import one file's crop with its label (see the module doc); ``conn`` is outside
    any transaction (the locks commit as they are taken, the rows in their own)."""
    require_upload(db, principal, lab)
    labels.check_class(taxonomy, class_code, field="class")
    digest = sha256_hex(data)
    with advisory_locks(conn, [lock_key("import", specimen, lab, digest)]):
        found = _existing(conn, lab, specimen, digest)
        if found is not None:
            return Imported(found["id"], digest, True, found["class_code"])
        rgb = images.decode_rgb(data, limits, field="image").rgb
        fitted = fit_into_frame(rgb, crop_size)
        crop_png = images.png_bytes(fitted.crop)
        mask_png = images.png_bytes(fitted.mask)
        crop_key = content_key("cells", sha256_hex(crop_png), ".png")
        mask_key = content_key("cells", sha256_hex(mask_png), ".mask.png")
        keys = [(crop_key, crop_png), (mask_key, mask_png)]
        with advisory_locks(conn, [object_lock_key(sha256_hex(b)) for _, b in keys]):
            created: list[str] = []
            try:
                for key, png in keys:
                    if not store.exists(key):
                        store.put(key, png, "image/png")
                        created.append(key)
                cell_id = _insert(
                    conn, principal, lab, specimen, class_code, digest, fitted, crop_key, mask_key
                )
            except BaseException:
                for key in created:
                    # Content-addressed and unreferenced if left: `storage check` finds it.
                    with contextlib.suppress(BmcellError):
                        store.delete(key)
                raise
    return Imported(cell_id, digest, False, class_code)


def _existing(conn: Connection, lab: str, specimen: str, digest: str) -> dict | None:
    row = conn.execute(
        """SELECT c.id, lb.class_code FROM cells c
             JOIN specimens s ON s.id = c.specimen_id JOIN labs l ON l.id = s.lab_id
             LEFT JOIN labels lb ON lb.cell_id = c.id
            WHERE l.code = %s AND s.code = %s AND c.import_sha256 = %s""",
        (lab, specimen, digest),
    ).fetchone()
    conn.commit()
    return row


def _insert(
    conn: Connection,
    principal: Principal,
    lab: str,
    specimen: str,
    class_code: str,
    digest: str,
    fitted: Fitted,
    crop_key: str,
    mask_key: str,
) -> int:
    x0, y0, x1, y1 = fitted.box
    area = float((x1 - x0) * (y1 - y0))
    with conn.transaction():
        lab_id, specimen_id, role = repo.upsert_specimen(conn, lab, specimen, "", "training")
        if role != "training":  # an imported label is training data (bmcell.specimens)
            raise FailedPrecondition(
                f"specimen {lab}/{specimen} is a {role} specimen: import into a training one",
                field="specimen",
            )
        cell_id = conn.execute(
            """INSERT INTO cells
                   (field_id, specimen_id, lab_id, index_in_field, x0, y0, x1, y1, crop_key,
                    mask_key, cell_area, nucleus_area, nucleus_cell_ratio, nucleus_axis_ratio,
                    nucleus_width_ratio, touches_border, status, import_sha256)
               VALUES (NULL, %s, %s, NULL, %s, %s, %s, %s, %s, %s, %s, 0, 0, 0, 0, false,
                       'labelled', %s)
               RETURNING id""",
            (specimen_id, lab_id, x0, y0, x1, y1, crop_key, mask_key, area, digest),
        ).fetchone()["id"]
        conn.execute(
            "INSERT INTO cell_thumbs (cell_id, size, pixels) VALUES (%s, %s, %s)",
            (
                cell_id,
                DEFAULT_INPUT_SIZE,
                thumbs.encode(preprocess.crop_to_uint8(fitted.crop, DEFAULT_INPUT_SIZE)),
            ),
        )
        conn.execute(
            """INSERT INTO labels (cell_id, class_code, source, round_added, labelled_by)
               VALUES (%s, %s, 'import', 0, %s)""",
            (cell_id, class_code, principal.user_id),
        )
        audit.record(
            conn,
            "cell.import",
            "cell",
            cell_id,
            {"lab": lab, "specimen": specimen, "sha256": digest},
            actor=principal,
            after={"class_code": class_code, "source": "import", "labelled_by": principal.user_id},
        )
    return cell_id
