"""Cells in Postgres: the segmenter's repository module."""

from __future__ import annotations

from psycopg import Connection

from bmcell import audit
from bmcell.db import Database
from bmcell.errors import InvalidArgument


def list_cells(
    db: Database,
    *,
    lab: str | None = None,
    specimen: str | None = None,
    field_id: int | None = None,
    limit: int,
    after_id: int | None = None,
    lab_ids: list[int] | None = None,
) -> list[dict]:
    """Up to ``limit`` cells matching every filter given, by id, after ``after_id`` (one
    page: :mod:`bmcell.paging`); ``lab_ids`` is the caller's scope (None: every lab), so
    a lab outside it lists as empty, like one that does not exist."""
    if not (lab or specimen or field_id):
        raise InvalidArgument("give a lab, a specimen or a field_id", field="specimen")
    with db.connection() as conn:
        return conn.execute(
            """SELECT c.*, l.code AS lab, s.code AS specimen, f.sha256 AS field_sha256
                 FROM cells c JOIN specimens s ON s.id = c.specimen_id JOIN labs l ON l.id = c.lab_id
                      LEFT JOIN field_images f ON f.id = c.field_id
                WHERE (%(lab)s::text IS NULL OR l.code = %(lab)s)
                  AND (%(specimen)s::text IS NULL OR s.code = %(specimen)s)
                  AND (%(field)s::bigint IS NULL OR c.field_id = %(field)s)
                  AND (%(labs)s::bigint[] IS NULL OR c.lab_id = ANY(%(labs)s))
                  AND (%(after)s::bigint IS NULL OR c.id > %(after)s)
                ORDER BY c.id LIMIT %(limit)s""",
            {
                "lab": lab,
                "specimen": specimen,
                "field": field_id,
                "labs": lab_ids,
                "after": after_id,
                "limit": limit,
            },
        ).fetchall()


def find_field(conn: Connection, lab: str, sha256: str) -> dict | None:
    """The field stored for these bytes in this lab (by code), with its cell counts, or
    None. Never another lab's: the same bytes in two labs are two fields."""
    return conn.execute(
        """SELECT f.id, f.width, f.height,
                  count(c.id) AS cells,
                  count(c.id) FILTER (WHERE c.touches_border) AS border_cells
             FROM field_images f JOIN labs l ON l.id = f.lab_id
                  LEFT JOIN cells c ON c.field_id = f.id
            WHERE l.code = %s AND f.sha256 = %s
            GROUP BY f.id""",
        (lab, sha256),
    ).fetchone()


def field_objects(conn: Connection, field_id: int) -> tuple[dict, list[dict]]:
    """A field's row and its cells' rows: what its stored objects must be."""
    field = conn.execute(
        "SELECT id, sha256, object_key, segmenter FROM field_images WHERE id = %s", (field_id,)
    ).fetchone()
    cells = conn.execute(
        """SELECT id, index_in_field, x0, y0, x1, y1, crop_key, mask_key
             FROM cells WHERE field_id = %s ORDER BY index_in_field""",
        (field_id,),
    ).fetchall()
    return field, cells


def specimen_role(db: Database, lab: str, specimen: str) -> str | None:
    """The role of an existing specimen (by codes), or None when there is none yet."""
    with db.connection() as conn:
        row = conn.execute(
            """SELECT s.role FROM specimens s JOIN labs l ON l.id = s.lab_id
                WHERE l.code = %s AND s.code = %s""",
            (lab, specimen),
        ).fetchone()
    return None if row is None else row["role"]


def upsert_specimen(
    conn: Connection, lab: str, specimen: str, diagnosis: str, role: str
) -> tuple[int, int, str]:
    """(lab_id, specimen_id, role), creating either on first use (a new specimen gets
    ``role``; an existing one keeps its own); a later diagnosis wins."""
    lab_id = conn.execute(
        """INSERT INTO labs (code) VALUES (%s)
           ON CONFLICT (code) DO UPDATE SET code = EXCLUDED.code RETURNING id""",
        (lab,),
    ).fetchone()["id"]
    row = conn.execute(
        """INSERT INTO specimens (lab_id, code, diagnosis, role) VALUES (%s, %s, %s, %s)
           ON CONFLICT (lab_id, code) DO UPDATE
              SET diagnosis = COALESCE(NULLIF(EXCLUDED.diagnosis, ''), specimens.diagnosis)
           RETURNING id, role, (xmax = 0) AS created""",
        (lab_id, specimen, diagnosis, role),
    ).fetchone()
    if row["created"]:  # who brought a specimen in, and as training or test, is history
        audit.record(
            conn,
            "specimen.add",
            "specimen",
            f"{lab}/{specimen}",
            after={"role": row["role"], "diagnosis": diagnosis},
        )
    return lab_id, row["id"], row["role"]


def insert_field(conn: Connection, row: dict) -> int | None:
    """The new field's id, or None when the lab already has a field with this sha256.

    The upload's filename is kept as sent only when the lab opted in
    (``labs.keep_filenames``); otherwise only its digest salted with the lab's own salt
    is stored (migration 0008: names often carry patient identifiers).
    """
    got = conn.execute(
        """INSERT INTO field_images
               (lab_id, specimen_id, sha256, object_key, filename, filename_sha256, format,
                width, height, size_bytes, segmenter, uploaded_by, um_per_px)
           SELECT %(lab_id)s, %(specimen_id)s, %(sha256)s, %(object_key)s,
                  CASE WHEN l.keep_filenames THEN %(filename)s ELSE '' END,
                  CASE WHEN %(filename)s = '' THEN ''
                       ELSE encode(sha256(l.filename_salt || convert_to(%(filename)s, 'UTF8')),
                                   'hex') END,
                  %(format)s, %(width)s, %(height)s, %(size_bytes)s, %(segmenter)s,
                  %(uploaded_by)s, %(um_per_px)s
             FROM labs l WHERE l.id = %(lab_id)s
           ON CONFLICT (lab_id, sha256) DO NOTHING RETURNING id""",
        row,
    ).fetchone()
    return None if got is None else got["id"]


def insert_cells(conn: Connection, rows: list[dict]) -> None:
    if not rows:
        return
    with conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO cells
                   (field_id, specimen_id, lab_id, index_in_field, x0, y0, x1, y1, crop_key,
                    mask_key, cell_area, nucleus_area, nucleus_cell_ratio, nucleus_axis_ratio,
                    nucleus_width_ratio, touches_border, status)
               VALUES (%(field_id)s, %(specimen_id)s, %(lab_id)s, %(index_in_field)s, %(x0)s,
                       %(y0)s, %(x1)s, %(y1)s, %(crop_key)s, %(mask_key)s, %(cell_area)s,
                       %(nucleus_area)s, %(nucleus_cell_ratio)s, %(nucleus_axis_ratio)s,
                       %(nucleus_width_ratio)s, %(touches_border)s, %(status)s)""",
            rows,
        )
