"""Cells in Postgres: the segmenter's repository module."""

from __future__ import annotations

from bmcell.db import Database
from bmcell.errors import InvalidArgument

MAX_LIST = 100_000


def list_cells(
    db: Database,
    *,
    lab: str | None = None,
    specimen: str | None = None,
    field_id: int | None = None,
    limit: int | None = None,
) -> list[dict]:
    if not (lab or specimen or field_id):
        raise InvalidArgument("give a lab, a specimen or a field_id", field="specimen")
    if limit is not None and not 0 < limit <= MAX_LIST:
        raise InvalidArgument(f"must be 1..{MAX_LIST}, got {limit}", field="limit")
    with db.connection() as conn:
        return conn.execute(
            """SELECT c.*, l.code AS lab, s.code AS specimen
                 FROM cells c JOIN specimens s ON s.id = c.specimen_id JOIN labs l ON l.id = c.lab_id
                WHERE (%(lab)s::text IS NULL OR l.code = %(lab)s)
                  AND (%(specimen)s::text IS NULL OR s.code = %(specimen)s)
                  AND (%(field)s::bigint IS NULL OR c.field_id = %(field)s)
                ORDER BY c.id LIMIT %(limit)s""",
            {"lab": lab, "specimen": specimen, "field": field_id, "limit": limit or MAX_LIST},
        ).fetchall()
