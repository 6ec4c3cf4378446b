"""Cell labels, their audit trail, and exports.

``labels`` holds a cell's current label; every change to it (and every "too difficult"
verdict) appends one ``audit_log`` row with who, when, and the label before and after.
Functions take a connection already inside the caller's transaction, so a label and
its audit row commit together or not at all.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator

import psycopg

from bmcell import audit
from bmcell.auth import Principal
from bmcell.errors import InvalidArgument, NotFound
from bmcell.taxonomy import Taxonomy

LABEL_FIELDS = ("class_code", "source", "round_id", "round_added", "labelled_by", "task_id")
EXPORT_COLUMNS = (
    "cell_id",
    "lab",
    "specimen",
    "is_test",
    "class_code",
    "source",
    "round",
    "round_added",
    "labelled_by",
    "task_id",
    "crop_key",
    "updated_at",
)


def check_class(taxonomy: Taxonomy, code: str | None, field: str = "class_code") -> str:
    if code is None or code not in taxonomy.codes:
        raise InvalidArgument(
            f"unknown class {code!r}; expected one of {', '.join(taxonomy.codes)}", field=field
        )
    return code


def _label_row(conn: psycopg.Connection, cell_id: int, *, lock: bool) -> dict | None:
    row = conn.execute(
        f"SELECT {', '.join(LABEL_FIELDS)} FROM labels WHERE cell_id = %s"
        + (" FOR UPDATE" if lock else ""),
        (cell_id,),
    ).fetchone()
    return dict(row) if row else None


def set_label(
    conn: psycopg.Connection,
    *,
    cell_id: int,
    class_code: str,
    source: str,
    round_id: int | None,
    round_added: int,
    reviewer: Principal,
    task_id: int | None,
) -> dict:
    """Upsert a cell's label from a finished review task; the cell becomes 'labelled'."""
    before = _label_row(conn, cell_id, lock=True)
    after = {
        "class_code": class_code,
        "source": source,
        "round_id": round_id,
        "round_added": round_added,
        "labelled_by": reviewer.user_id,
        "task_id": task_id,
    }
    conn.execute(
        """INSERT INTO labels (cell_id, class_code, source, round_id, round_added,
                               labelled_by, task_id)
           VALUES (%(cell)s, %(class_code)s, %(source)s, %(round_id)s, %(round_added)s,
                   %(labelled_by)s, %(task_id)s)
           ON CONFLICT (cell_id) DO UPDATE SET
               class_code = EXCLUDED.class_code, source = EXCLUDED.source,
               round_id = EXCLUDED.round_id, round_added = EXCLUDED.round_added,
               labelled_by = EXCLUDED.labelled_by, task_id = EXCLUDED.task_id,
               updated_at = now()""",
        {"cell": cell_id, **after},
    )
    conn.execute("UPDATE cells SET status = 'labelled' WHERE id = %s", (cell_id,))
    audit.record(
        conn,
        "label.review" if before is None else "label.relabel",
        "cell",
        cell_id,
        actor=reviewer,
        before=before,
        after=after,
    )
    return after


def mark_difficult(
    conn: psycopg.Connection, *, cell_id: int, reviewer: Principal, task_id: int
) -> None:
    """The reviewers said "too difficult": no label, never sampled again."""
    before = conn.execute(
        "SELECT status FROM cells WHERE id = %s FOR UPDATE", (cell_id,)
    ).fetchone()
    conn.execute("UPDATE cells SET status = 'difficult' WHERE id = %s", (cell_id,))
    audit.record(
        conn,
        "cell.difficult",
        "cell",
        cell_id,
        actor=reviewer,
        before={"status": before["status"]} if before else None,
        after={"status": "difficult", "task_id": task_id},
    )


def correct_label(
    conn: psycopg.Connection,
    principal: Principal,
    taxonomy: Taxonomy,
    cell_id: int,
    class_code: str,
    note: str,
) -> dict:
    """An admin's or reviewer's correction of an existing label, used from the next round.

    ``round_added`` moves to the round after the newest one, so newest-first retention
    keeps the corrected label when the next training set is drawn.
    """
    cell = conn.execute("SELECT lab_id FROM cells WHERE id = %s", (cell_id,)).fetchone()
    if cell is None or not principal.sees_lab(cell["lab_id"]):
        raise NotFound(f"cell {cell_id} does not exist", field="cell_id")
    check_class(taxonomy, class_code)
    before = _label_row(conn, cell_id, lock=True)
    if before is None:
        raise NotFound(f"cell {cell_id} has no label to correct", field="cell_id")
    if before["class_code"] == class_code:
        return before
    row = conn.execute(
        """UPDATE labels SET class_code = %s, labelled_by = %s, updated_at = now(),
                  round_added = COALESCE((SELECT max(number) FROM rounds), -1) + 1
            WHERE cell_id = %s
        RETURNING """
        + ", ".join(LABEL_FIELDS),
        (class_code, principal.user_id, cell_id),
    ).fetchone()
    after = dict(row)
    audit.record(
        conn,
        "label.correct",
        "cell",
        cell_id,
        actor=principal,
        before=before,
        after={**after, "note": note} if note else after,
    )
    return after


def label_history(conn: psycopg.Connection, cell_id: int) -> list[dict]:
    return conn.execute(
        """SELECT at, actor_name AS actor, action, before, after
             FROM audit_log WHERE entity = 'cell' AND entity_id = %s ORDER BY id""",
        (str(cell_id),),
    ).fetchall()


#: The rows every export may hold: the caller's labs (``all``, ``scope``), then the
#: labs, round and class asked for; ``l`` labels, ``c`` cells, ``r`` rounds.
EXPORT_FILTER = """WHERE (%(all)s OR c.lab_id = ANY(%(scope)s))
                  AND (%(labs)s::bigint[] IS NULL OR c.lab_id = ANY(%(labs)s))
                  AND (%(round)s::int IS NULL OR r.number = %(round)s)
                  AND (%(class)s::text IS NULL OR l.class_code = %(class)s)"""


def export_params(
    principal: Principal,
    *,
    round_number: int | None,
    lab_ids: list[int] | None,
    class_code: str | None,
    limit: int,
) -> dict:
    """The parameters of :data:`EXPORT_FILTER` (and ``limit``)."""
    return {
        "all": principal.all_labs,
        "scope": principal.lab_list(),
        "labs": lab_ids,
        "round": round_number,
        "class": class_code,
        "limit": limit,
    }


def export_rows(
    conn: psycopg.Connection,
    principal: Principal,
    *,
    round_number: int | None,
    lab_ids: list[int] | None,
    class_code: str | None,
    limit: int,
) -> Iterator[dict]:
    """Labels the caller may see, by cell id, filtered as asked (the route's role rule
    is bmcell.policy's). The rows come from a server-side cursor as they are iterated,
    so an export of half a million labels never sits in memory.
    """
    params = export_params(
        principal, round_number=round_number, lab_ids=lab_ids, class_code=class_code, limit=limit
    )
    return _stream_export(conn, params)


def _stream_export(conn: psycopg.Connection, params: dict) -> Iterator[dict]:
    with conn.cursor(name="labels_export") as cur:
        cur.itersize = 1000
        cur.execute(
            f"""SELECT l.cell_id, lab.code AS lab, s.code AS specimen, s.is_test, l.class_code,
                      l.source, r.number AS round, l.round_added, u.name AS labelled_by,
                      l.task_id, c.crop_key, l.updated_at
                 FROM labels l
                 JOIN cells c ON c.id = l.cell_id
                 JOIN labs lab ON lab.id = c.lab_id
                 JOIN specimens s ON s.id = c.specimen_id
                 LEFT JOIN rounds r ON r.id = l.round_id
                 LEFT JOIN users u ON u.id = l.labelled_by
                {EXPORT_FILTER}
                ORDER BY l.cell_id
                LIMIT %(limit)s""",
            params,
        )
        yield from cur


def record_export(
    conn: psycopg.Connection,
    principal: Principal,
    *,
    round_number: int | None,
    lab_ids: list[int] | None,
    class_code: str | None,
) -> None:
    """Audit an export as it starts (labels leave the system): who, and which filter."""
    audit.record(
        conn,
        "labels.export",
        "labels",
        "all" if lab_ids is None else ",".join(map(str, lab_ids)),
        {"round": round_number, "lab_ids": lab_ids, "class": class_code},
        actor=principal,
    )


def to_csv(rows: Iterable[dict]) -> str:
    return "".join(csv_lines(rows))


def csv_lines(rows: Iterable[dict]) -> Iterator[str]:
    """The CSV export, a header line then one line per row, as the rows come."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=EXPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "updated_at": row["updated_at"].isoformat()})
        if buf.tell() > 64 * 1024:
            yield _drain(buf)
    yield _drain(buf)


def json_chunks(rows: Iterable[dict]) -> Iterator[str]:
    """``{"labels": [...], "count": N}``, written as the rows come."""
    yield '{"labels": ['
    count = 0
    for row in rows:
        prefix = "," if count else ""
        yield prefix + json.dumps({**row, "updated_at": row["updated_at"].isoformat()})
        count += 1
    yield f'], "count": {count}}}'


def _drain(buf: io.StringIO) -> str:
    text = buf.getvalue()
    buf.seek(0)
    buf.truncate()
    return text
