"""Postgres access for rounds: the round rows, their tasks, labels and the bootstrap waves."""

from __future__ import annotations

import json

import numpy as np
import psycopg

from bmcell import audit
from bmcell import pool as pool_
from bmcell.errors import FailedPrecondition, NotFound

LIVE_STATES = ("created", "predicting", "selecting", "reviewing", "training", "evaluating")
_SETTABLE = ("model_in", "model_out", "params", "waves", "short_classes", "failed_step")


def get(conn: psycopg.Connection, round_id: int) -> dict:
    row = conn.execute("SELECT * FROM rounds WHERE id = %s", (round_id,)).fetchone()
    if row is None:
        raise NotFound(f"round {round_id} does not exist", field="round_id")
    return row


def latest(conn: psycopg.Connection, experiment: str) -> dict:
    row = conn.execute(
        "SELECT * FROM rounds WHERE experiment = %s ORDER BY number DESC LIMIT 1", (experiment,)
    ).fetchone()
    if row is None:
        raise NotFound(f"experiment {experiment!r} has no rounds", field="experiment")
    return row


def list_rounds(
    conn: psycopg.Connection,
    experiment: str | None,
    *,
    limit: int,
    after: tuple[str, int] | None = None,
) -> list[dict]:
    """Up to ``limit`` rounds by (experiment, number), after ``after`` (one page)."""
    return conn.execute(
        """SELECT * FROM rounds
            WHERE (%(e)s::text IS NULL OR experiment = %(e)s)
              AND (%(ae)s::text IS NULL OR (experiment, number) > (%(ae)s, %(an)s))
            ORDER BY experiment, number LIMIT %(limit)s""",
        {
            "e": experiment,
            "ae": after[0] if after else None,
            "an": after[1] if after else None,
            "limit": limit,
        },
    ).fetchall()


def live_round_ids(conn: psycopg.Connection) -> list[int]:
    rows = conn.execute(
        "SELECT id FROM rounds WHERE driven AND state = ANY(%s) ORDER BY id", (list(LIVE_STATES),)
    ).fetchall()
    return [r["id"] for r in rows]


def create(conn: psycopg.Connection, experiment: str, strategy: str, params: dict) -> dict:
    """The next round of ``experiment``; refuses while its previous round is still live."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"rounds:{experiment}",))
    prev = conn.execute(
        "SELECT * FROM rounds WHERE experiment = %s AND driven ORDER BY number DESC LIMIT 1",
        (experiment,),
    ).fetchone()
    last_number = conn.execute(
        "SELECT max(number) AS n FROM rounds WHERE experiment = %s", (experiment,)
    ).fetchone()["n"]
    if prev is not None and prev["state"] in LIVE_STATES:
        raise FailedPrecondition(
            f"round {prev['number']} of {experiment!r} is still {prev['state']}; "
            "wait for it to finish"
        )
    if strategy == "bootstrap":
        if prev is not None and prev["strategy"] != "bootstrap":
            raise FailedPrecondition(f"{experiment!r} is past its bootstrap")
    elif not conn.execute(
        "SELECT 1 FROM rounds WHERE experiment = %s AND strategy = 'bootstrap' "
        "AND state = 'published' AND driven",
        (experiment,),
    ).fetchone():
        raise FailedPrecondition(
            f"{experiment!r} needs a published bootstrap round first (the 0.80 gate): "
            "bmcell round start --strategy bootstrap"
        )
    number = 0 if last_number is None else last_number + 1
    row = conn.execute(
        "INSERT INTO rounds (experiment, number, strategy, params, driven) "
        "VALUES (%s, %s, %s, %s, true) RETURNING *",
        (experiment, number, strategy, json.dumps(params)),
    ).fetchone()
    # Starting again after a failed round is the retry of that round.
    retry_of = prev["id"] if prev is not None and prev["state"] == "failed" else None
    audit.record(
        conn,
        "round.start" if retry_of is None else "round.retry",
        "round",
        row["id"],
        {"experiment": experiment, "number": number, "strategy": strategy, "params": params}
        | ({} if retry_of is None else {"retry_of": retry_of}),
    )
    return row


def set_state(
    conn: psycopg.Connection,
    round_id: int,
    state: str,
    message: str | None = None,
    **columns: object,
) -> None:
    sets = ["state = %(state)s", "updated_at = now()"]
    if message is not None:
        sets.append("message = %(message)s")
    for col in columns:
        if col not in _SETTABLE:
            raise ValueError(f"cannot set rounds.{col}")
        sets.append(f"{col} = %({col})s")
    values = {k: json.dumps(v) if k == "params" else v for k, v in columns.items()}
    conn.execute(
        f"UPDATE rounds SET {', '.join(sets)} WHERE id = %(id)s",
        {"state": state, "message": message, "id": round_id, **values},
    )


def task_counts(conn: psycopg.Connection, round_id: int) -> dict[str, int]:
    rows = conn.execute(
        "SELECT state, count(*) AS n FROM review_tasks WHERE round_id = %s GROUP BY state",
        (round_id,),
    ).fetchall()
    return {r["state"]: r["n"] for r in rows}


def labels_added(conn: psycopg.Connection, round_id: int) -> dict[str, int]:
    rows = conn.execute(
        "SELECT class_code, count(*) AS n FROM labels WHERE round_id = %s GROUP BY class_code",
        (round_id,),
    ).fetchall()
    return {r["class_code"]: r["n"] for r in rows}


def cancel_open_tasks(conn: psycopg.Connection, round_id: int) -> int:
    """Past the deadline or quorum: unanswered tasks go, their cells back to the pool."""
    rows = conn.execute(
        "UPDATE review_tasks SET state = 'cancelled', lease_owner = NULL, lease_token = NULL, "
        "lease_expires_at = NULL WHERE round_id = %s AND state IN ('open', 'leased') "
        "RETURNING cell_id",
        (round_id,),
    ).fetchall()
    ids = [r["cell_id"] for r in rows]
    conn.execute(
        "UPDATE cells SET status = 'unlabelled' WHERE id = ANY(%s) AND status = 'pending'", (ids,)
    )
    return len(ids)


def pool(conn: psycopg.Connection, *, test: bool, labs: list[str]) -> np.ndarray:
    rows = conn.execute(
        """SELECT c.id FROM cells c JOIN specimens s ON s.id = c.specimen_id
             JOIN labs l ON l.id = c.lab_id
            WHERE c.status = 'unlabelled' AND s.is_test = %(test)s AND s.role <> 'excluded'
              AND (cardinality(%(labs)s::text[]) = 0 OR l.code = ANY(%(labs)s))""",
        {"test": test, "labs": labs},
    ).fetchall()
    return np.fromiter((r["id"] for r in rows), dtype=np.int64, count=len(rows))


def insert_bootstrap_tasks(
    conn: psycopg.Connection, round_id: int, kind: str, cell_ids: list[int], required_reviews: int
) -> int:
    """Tasks for those of ``cell_ids`` still unlabelled; returns how many were created."""
    free = pool_.take_unlabelled(conn, cell_ids)
    if not free:
        return 0
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO review_tasks (round_id, cell_id, kind, required_reviews) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
            [(round_id, c, kind, required_reviews) for c in free],
        )
    return len(free)


def label_counts(
    conn: psycopg.Connection, experiment: str, sources: tuple[str, ...]
) -> dict[str, int]:
    """Labels per class of ``sources`` that rounds of ``experiment`` added: labels of
    other experiments in the same database never count towards this one's quotas."""
    rows = conn.execute(
        "SELECT l.class_code, count(*) AS n FROM labels l JOIN rounds r ON r.id = l.round_id "
        "WHERE r.experiment = %s AND l.source = ANY(%s) GROUP BY l.class_code",
        (experiment, list(sources)),
    ).fetchall()
    return {r["class_code"]: r["n"] for r in rows}


def has_validation_split(conn: psycopg.Connection, experiment: str) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM labels l JOIN rounds r ON r.id = l.round_id "
            "WHERE r.experiment = %s AND l.source = 'validation' LIMIT 1",
            (experiment,),
        ).fetchone()
        is not None
    )


def bootstrap_labels(conn: psycopg.Connection, experiment: str) -> list[dict]:
    """The experiment's initial labels (of every bootstrap round it ran)."""
    return conn.execute(
        "SELECT l.cell_id, l.class_code, l.source FROM labels l JOIN rounds r ON r.id = l.round_id "
        "WHERE r.experiment = %s AND l.source = 'initial' ORDER BY l.cell_id",
        (experiment,),
    ).fetchall()


def move_to_validation(conn: psycopg.Connection, cell_ids: list[int]) -> None:
    """The fixed validation split: chosen once from the bootstrap's labels, audited."""
    moved = conn.execute(
        "UPDATE labels SET source = 'validation', updated_at = now() "
        "WHERE cell_id = ANY(%s) AND source = 'initial' RETURNING cell_id",
        (cell_ids,),
    ).fetchall()
    audit.record_each(
        conn,
        "label.split",
        "cell",
        [r["cell_id"] for r in moved],
        before={"source": "initial"},
        after={"source": "validation"},
    )


def model_version(conn: psycopg.Connection, model_name: str, version: int) -> dict | None:
    return conn.execute(
        "SELECT * FROM model_versions WHERE model_name = %s AND version = %s",
        (model_name, version),
    ).fetchone()


def active_version(conn: psycopg.Connection, model_name: str) -> int | None:
    row = conn.execute(
        "SELECT version FROM model_versions WHERE model_name = %s AND state = 'active'",
        (model_name,),
    ).fetchone()
    return row["version"] if row else None


def latest_job(conn: psycopg.Connection, round_id: int, set_aside: list[str]) -> dict | None:
    """The round's newest training job, whatever its state, other than those a retry
    set aside: a job that failed is the round's news, never a reason to start another."""
    return conn.execute(
        "SELECT * FROM training_jobs WHERE round_id = %s AND NOT (id = ANY(%s)) "
        "ORDER BY created_at DESC LIMIT 1",
        (round_id, set_aside),
    ).fetchone()


def retry(conn: psycopg.Connection, round_id: int) -> dict:
    """A failed round goes back to the step that failed; audited with the caller."""
    r = conn.execute("SELECT * FROM rounds WHERE id = %s FOR UPDATE", (round_id,)).fetchone()
    if r is None:
        raise NotFound(f"round {round_id} does not exist", field="round_id")
    if r["state"] != "failed":
        raise FailedPrecondition(
            f"round {r['number']} of {r['experiment']!r} is {r['state']}, not failed: "
            "only a failed round can be retried"
        )
    if not r["driven"]:
        raise FailedPrecondition(f"round {r['number']} was not started by the rounds service")
    if not r["failed_step"]:
        raise FailedPrecondition(
            f"round {r['number']} failed where a retry cannot help ({r['message']}); "
            "start a new round instead"
        )
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"rounds:{r['experiment']}",))
    later = conn.execute(
        "SELECT number FROM rounds WHERE experiment = %s AND number > %s AND driven "
        "ORDER BY number DESC LIMIT 1",
        (r["experiment"], r["number"]),
    ).fetchone()
    if later is not None:
        raise FailedPrecondition(
            f"round {later['number']} of {r['experiment']!r} came after round {r['number']}; "
            "only the latest round can be retried"
        )
    params = dict(r["params"])
    if r["failed_step"] == "training":
        # The failed job stays failed; the retry's training starts a new one.
        jobs = conn.execute(
            "SELECT id FROM training_jobs WHERE round_id = %s AND state IN ('failed', 'cancelled')",
            (round_id,),
        ).fetchall()
        params["retried_jobs"] = sorted({*params.get("retried_jobs", []), *(j["id"] for j in jobs)})
        params.pop("training_job", None)
    message = f"retrying from {r['failed_step']} (was: {r['message']})"
    row = conn.execute(
        "UPDATE rounds SET state = failed_step, failed_step = NULL, message = %s, params = %s, "
        "updated_at = now() WHERE id = %s RETURNING *",
        (message[:2000], json.dumps(params), round_id),
    ).fetchone()
    audit.record(
        conn,
        "round.retry",
        "round",
        round_id,
        {"experiment": r["experiment"], "number": r["number"]},
        before={"state": "failed", "message": r["message"]},
        after={"state": r["failed_step"]},
    )
    return row
