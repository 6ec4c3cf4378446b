"""The training_jobs aggregate and the rows training reads: the trainer's SQL, in one place.

A job is ``queued`` when created, ``running`` once a trainer process drives it, and
ends ``succeeded``, ``failed`` or ``cancelled``. Only live jobs (queued, running)
change: every update from the driver says ``WHERE state IN live``, so a job that
CancelJob ended is never brought back by a late progress write.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg

from bmcell import audit
from bmcell.db import Database
from bmcell.errors import FailedPrecondition, NotFound
from bmcell.trainset import LabelledCell

LIVE = ("queued", "running")
FINAL = ("succeeded", "failed", "cancelled")


def new_job_id() -> str:
    return f"train-{uuid.uuid4().hex[:12]}"


def get(db: Database, job_id: str) -> dict:
    with db.connection() as conn:
        row = conn.execute("SELECT * FROM training_jobs WHERE id = %s", (job_id,)).fetchone()
    if row is None:
        raise NotFound(f"no training job {job_id!r}", field="job_id")
    return row


def live_for_round(db: Database, round_id: int) -> dict | None:
    with db.connection() as conn:
        return conn.execute(
            "SELECT * FROM training_jobs WHERE round_id = %s AND state = ANY(%s)",
            (round_id, list(LIVE)),
        ).fetchone()


def create(db: Database, round_id: int | None, config: dict[str, Any], epochs: int) -> dict:
    """Insert a queued job; for a round that already has a live one, return that one."""
    try:
        with db.transaction() as conn:
            row = conn.execute(
                """INSERT INTO training_jobs (id, round_id, config, epochs)
                   VALUES (%s, %s, %s, %s) RETURNING *""",
                (new_job_id(), round_id, json.dumps(config), epochs),
            ).fetchone()
            audit.record(
                conn,
                "training.start",
                "training_job",
                row["id"],
                _audited_plan(config),
            )
            return row
    except psycopg.errors.UniqueViolation:
        existing = live_for_round(db, round_id) if round_id is not None else None
        if existing is None:  # it ended between the insert and this read: try once more
            return create(db, round_id, config, epochs)
        return existing


def _audited_plan(config: dict[str, Any]) -> dict[str, Any]:
    """What the audit keeps of a plan: its settings (the promotion gate among them) and
    the sizes of its cell lists, not the lists."""
    sizes = {f"{name}_cells": len(config.get(name, ())) for name in ("train", "validation", "test")}
    scalars = {k: v for k, v in config.items() if isinstance(v, int | float | str | None)}
    return scalars | sizes


def live_jobs(db: Database) -> list[dict]:
    with db.connection() as conn:
        return conn.execute(
            "SELECT * FROM training_jobs WHERE state = ANY(%s) ORDER BY created_at",
            (list(LIVE),),
        ).fetchall()


def update(db: Database, job_id: str, **values: Any) -> dict | None:
    """Set columns of a live job; returns the row, or None when the job already ended."""
    cols = ", ".join(f"{k} = %s" for k in values)
    args = [json.dumps(v) if k in ("history", "config") else v for k, v in values.items()]
    with db.transaction() as conn:
        return conn.execute(
            f"UPDATE training_jobs SET {cols}, updated_at = now() "
            "WHERE id = %s AND state = ANY(%s) RETURNING *",
            (*args, job_id, list(LIVE)),
        ).fetchone()


def cancel(db: Database, job_id: str) -> dict:
    with db.transaction() as conn:
        row = conn.execute(
            """UPDATE training_jobs SET state = 'cancelled', message = 'cancelled by request',
                      updated_at = now()
                WHERE id = %s AND state = ANY(%s) RETURNING *""",
            (job_id, list(LIVE)),
        ).fetchone()
        if row is not None:
            audit.record(
                conn, "training.cancel", "training_job", job_id, {"round_id": row["round_id"]}
            )
    return row or get(db, job_id)


def counts_by_state(db: Database) -> dict[str, int]:
    with db.connection() as conn:
        rows = conn.execute(
            "SELECT state, count(*) AS n FROM training_jobs GROUP BY state"
        ).fetchall()
    return {r["state"]: r["n"] for r in rows}


# --- what a round trains on -----------------------------------------------------------


def round_row(db: Database, round_id: int) -> dict:
    with db.connection() as conn:
        row = conn.execute("SELECT * FROM rounds WHERE id = %s", (round_id,)).fetchone()
    if row is None:
        raise NotFound(f"no round {round_id}", field="round_id")
    return row


def labelled_cells(
    db: Database, max_round: int | None, experiment: str | None = None
) -> tuple[list[LabelledCell], dict]:
    """Every current label up to round ``max_round`` (None: all), of rounds of
    ``experiment`` (None: any), and crop keys by cell id."""
    with db.connection() as conn:
        rows = conn.execute(
            """SELECT l.cell_id, l.class_code, l.round_added, l.source, c.specimen_id,
                      s.is_test, l.created_at, c.crop_key
                 FROM labels l
                 JOIN cells c ON c.id = l.cell_id
                 JOIN specimens s ON s.id = c.specimen_id AND s.role <> 'excluded'
                WHERE (%s::int IS NULL OR l.round_added <= %s::int)
                  AND (%s::text IS NULL
                       OR l.round_id IN (SELECT id FROM rounds WHERE experiment = %s)
                       -- imported labels belong to no round: every experiment's
                       OR (l.round_id IS NULL AND l.source = 'import'))""",
            (max_round, max_round, experiment, experiment),
        ).fetchall()
    cells = [
        LabelledCell(
            cell_id=r["cell_id"],
            class_code=r["class_code"],
            round_added=r["round_added"],
            source=r["source"],
            specimen_id=r["specimen_id"],
            is_test_specimen=r["is_test"],
            labelled_at=r["created_at"],
        )
        for r in rows
    ]
    return cells, {r["cell_id"]: r["crop_key"] for r in rows}


# --- model versions ---------------------------------------------------------------------


def active_version(db: Database, model_name: str) -> dict | None:
    with db.connection() as conn:
        return conn.execute(
            "SELECT * FROM model_versions WHERE model_name = %s AND state = 'active'",
            (model_name,),
        ).fetchone()


def version_of_job(db: Database, model_name: str, job_id: str) -> dict | None:
    """The version a job registered already (a resumed job must not register twice)."""
    with db.connection() as conn:
        return conn.execute(
            "SELECT * FROM model_versions WHERE model_name = %s AND metrics->>'job_id' = %s",
            (model_name, job_id),
        ).fetchone()


def model_version(db: Database, model_name: str, version: int) -> dict:
    with db.connection() as conn:
        row = conn.execute(
            "SELECT * FROM model_versions WHERE model_name = %s AND version = %s",
            (model_name, version),
        ).fetchone()
    if row is None:
        raise NotFound(f"{model_name} has no version {version}", field="version")
    return row


def set_confusion_key(db: Database, model_name: str, version: int, key: str) -> None:
    with db.transaction() as conn:
        conn.execute(
            "UPDATE model_versions SET confusion_key = %s WHERE model_name = %s AND version = %s",
            (key, model_name, version),
        )


def reject(db: Database, model_name: str, version: int, note: str) -> None:
    with db.transaction() as conn:
        row = conn.execute(
            """UPDATE model_versions SET state = 'rejected', note = %s
                WHERE model_name = %s AND version = %s AND state = 'registered' RETURNING id""",
            (note, model_name, version),
        ).fetchone()
    if row is None:
        raise FailedPrecondition(f"{model_name} v{version} is no longer 'registered'")
