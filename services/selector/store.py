"""Postgres access for selection: the pool, predictions, and the selection record."""

from __future__ import annotations

import json

import numpy as np
import psycopg

from bmcell.errors import FailedPrecondition, NotFound
from bmcell.pool import take_unlabelled


def get_round(conn: psycopg.Connection, round_id: int) -> dict:
    row = conn.execute("SELECT * FROM rounds WHERE id = %s", (round_id,)).fetchone()
    if row is None:
        raise NotFound(f"round {round_id} does not exist", field="round_id")
    return row


def get_selection(conn: psycopg.Connection, round_id: int) -> dict | None:
    return conn.execute(
        """SELECT s.*, (SELECT count(*) FROM review_tasks t WHERE t.round_id = s.round_id) AS tasks
             FROM selections s WHERE s.round_id = %s""",
        (round_id,),
    ).fetchone()


def unknown_labs(conn: psycopg.Connection, labs: list[str]) -> list[str]:
    known = {r["code"] for r in conn.execute("SELECT code FROM labs WHERE code = ANY(%s)", (labs,))}
    return sorted(set(labs) - known)


def pool_cell_ids(conn: psycopg.Connection, labs: list[str]) -> np.ndarray:
    """Unlabelled cells of training specimens in scope.

    Excluded by status: labelled, pending review, too difficult, cut by the border.
    Only training specimens feed training: cells of test and excluded specimens are
    never candidates.
    """
    rows = conn.execute(
        """SELECT c.id FROM cells c
             JOIN specimens s ON s.id = c.specimen_id
             JOIN labs l ON l.id = c.lab_id
            WHERE c.status = 'unlabelled' AND s.role = 'training'
              AND (cardinality(%(labs)s::text[]) = 0 OR l.code = ANY(%(labs)s))""",
        {"labs": labs},
    ).fetchall()
    return np.fromiter((r["id"] for r in rows), dtype=np.int64, count=len(rows))


def active_model(conn: psycopg.Connection, model_name: str) -> dict:
    row = conn.execute(
        "SELECT * FROM model_versions WHERE model_name = %s AND state = 'active'", (model_name,)
    ).fetchone()
    if row is None:
        raise FailedPrecondition(f"no active version of model {model_name!r}: publish one first")
    return row


def probabilities(
    conn: psycopg.Connection, cell_ids: np.ndarray, model_name: str, version: int
) -> np.ndarray:
    """Stored predictions for ``cell_ids`` in that order, as an (n, C) float32 matrix."""
    rows = conn.execute(
        """SELECT p.probabilities FROM unnest(%s::bigint[]) WITH ORDINALITY AS q(id, ord)
             JOIN predictions p ON p.cell_id = q.id AND p.model_name = %s AND p.model_version = %s
            ORDER BY q.ord""",
        (cell_ids.tolist(), model_name, version),
    ).fetchall()
    if len(rows) != len(cell_ids):
        raise FailedPrecondition(
            f"{len(cell_ids) - len(rows)} sampled cells have no prediction from "
            f"{model_name} v{version}; the classifier did not finish"
        )
    return np.asarray([r["probabilities"] for r in rows], dtype=np.float32).reshape(len(rows), -1)


def insert_selection(conn: psycopg.Connection, record: dict) -> bool:
    """Insert the round's selection record; False when another call got there first."""
    cur = conn.execute(
        """INSERT INTO selections (round_id, strategy, seed, pool_size, sample_size, model_version,
                                   params, counts_by_kind, counts_by_class)
           VALUES (%(round_id)s, %(strategy)s, %(seed)s, %(pool_size)s, %(sample_size)s,
                   %(model_version)s, %(params)s, %(counts_by_kind)s, %(counts_by_class)s)
           ON CONFLICT (round_id) DO NOTHING""",
        {
            **record,
            "params": json.dumps(record["params"]),
            "counts_by_kind": json.dumps(record["counts_by_kind"]),
            "counts_by_class": json.dumps(record["counts_by_class"]),
        },
    )
    return cur.rowcount == 1


def insert_tasks(conn: psycopg.Connection, round_id: int, tasks: list[dict]) -> int:
    """Review tasks for the cells still in the pool, which become 'pending'.

    Cells another round took since the pool was read are left to that round.
    """
    free = set(take_unlabelled(conn, [t["cell_id"] for t in tasks]))
    tasks = [t for t in tasks if t["cell_id"] in free]
    if not tasks:
        return 0
    with conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO review_tasks (round_id, cell_id, kind, suggested_class,
                                         top_classes, top_probabilities)
               VALUES (%(round_id)s, %(cell_id)s, %(kind)s, %(suggested_class)s,
                       %(top_classes)s, %(top_probabilities)s)""",
            [{**t, "round_id": round_id} for t in tasks],
        )
    return len(tasks)


def insert_pseudo_labels(
    conn: psycopg.Connection, round_row: dict, labels: list[tuple[int, str]]
) -> int:
    """Plain self-training: labels without review (source 'st')."""
    free = set(take_unlabelled(conn, [c for c, _ in labels]))
    labels = [(c, code) for c, code in labels if c in free]
    if not labels:
        return 0
    with conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO labels (cell_id, class_code, source, round_id, round_added)
               VALUES (%s, %s, 'st', %s, %s) ON CONFLICT (cell_id) DO NOTHING""",
            [(cid, code, round_row["id"], round_row["number"]) for cid, code in labels],
        )
    conn.execute(
        "UPDATE cells SET status = 'labelled' WHERE id = ANY(%s)", ([c for c, _ in labels],)
    )
    return len(labels)
