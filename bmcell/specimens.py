"""Labs and specimens as managed resources: the repository behind ``bmcell labs`` and
``bmcell specimens``, served by the labeling API (``/v1/labs``, ``/v1/specimens``).

A specimen's ``role`` says what its cells are for (migration 0010):

- ``training``: sampled for review, labelled, trained on (validation cells come from
  these too);
- ``test``: the held-out test split only, never trained on;
- ``excluded``: neither; its cells are never sampled, trained on or tested on.

Changing the role of a specimen that is already *used* (its cells carry labels of a
training source, validation or test labels, or were in a succeeded training job's
cell lists) would silently move data between splits, so it is refused
(:class:`~bmcell.errors.Conflict`, naming what uses it) unless forced. A forced change
withdraws the labels the new role does not allow (their values stay in the audit
trail, the cells go back to the pool) and reports what it invalidated, including the
model versions trained on those cells, which an operator may want to retire. Any
change cancels the specimen's open review tasks of kinds the new role does not allow
(all of them for ``excluded``).

Functions take an open connection inside a transaction; every change is audited in
it, with the caller as actor.
"""

from __future__ import annotations

import re

import psycopg

from bmcell import audit
from bmcell.auth import Principal
from bmcell.errors import Conflict, InvalidArgument, NotFound

ROLES = ("training", "test", "excluded")
TRAINING_SOURCES = ("initial", "cst", "al", "st", "random", "import")
# Label sources and review-task kinds a specimen of each role may hold.
ALLOWED_SOURCES = {
    "training": frozenset({*TRAINING_SOURCES, "validation"}),
    "test": frozenset({"test"}),
    "excluded": frozenset(),
}
ALLOWED_TASKS = {
    "training": frozenset({"cst", "al", "initial", "validation", "adjudication"}),
    "test": frozenset({"test", "adjudication"}),
    "excluded": frozenset(),
}
_CODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
MAX_NAME = 200


def check_role(role: str, field: str = "role") -> str:
    if role not in ROLES:
        raise InvalidArgument(
            f"unknown specimen role {role!r}; expected one of {', '.join(ROLES)}", field=field
        )
    return role


def check_code(code: str, field: str = "code") -> str:
    if not _CODE.match(code):
        raise InvalidArgument(
            f"{code!r} is not a code (a letter or digit, then letters, digits, '.', '_', '-'; "
            "up to 63)",
            field=field,
        )
    return code


# --- labs --------------------------------------------------------------------------------

_LABS = """SELECT l.code, l.name, l.created_at,
                  (SELECT count(*) FROM specimens s WHERE s.lab_id = l.id) AS specimens
             FROM labs l"""


def list_labs(conn: psycopg.Connection, principal: Principal) -> list[dict]:
    """Every lab the caller sees (lab-bound roles: their own), by code."""
    return conn.execute(
        _LABS + " WHERE %s OR l.id = ANY(%s) ORDER BY l.code",
        (principal.all_labs, principal.lab_list()),
    ).fetchall()


def add_lab(conn: psycopg.Connection, code: str, name: str) -> dict:
    check_code(code)
    if len(name) > MAX_NAME or not name.isprintable():
        raise InvalidArgument(f"must be at most {MAX_NAME} printable characters", field="name")
    row = conn.execute(
        "INSERT INTO labs (code, name) VALUES (%s, %s) ON CONFLICT (code) DO NOTHING RETURNING id",
        (code, name),
    ).fetchone()
    if row is None:
        raise Conflict(f"lab {code!r} already exists", field="code")
    audit.record(conn, "lab.add", "lab", code, after={"name": name})
    return conn.execute(_LABS + " WHERE l.id = %s", (row["id"],)).fetchone()


def _lab_id(conn: psycopg.Connection, principal: Principal, code: str) -> int:
    check_code(code, field="lab")
    row = conn.execute("SELECT id FROM labs WHERE code = %s", (code,)).fetchone()
    if row is None or not principal.sees_lab(row["id"]):
        raise NotFound(f"lab {code!r} does not exist", field="lab")
    return row["id"]


# --- specimens ---------------------------------------------------------------------------

_SPECIMENS = """SELECT l.code AS lab, s.code, s.diagnosis, s.role, s.created_at,
                       (SELECT count(*) FROM field_images f WHERE f.specimen_id = s.id) AS fields,
                       (SELECT count(*) FROM cells c WHERE c.specimen_id = s.id) AS cells
                  FROM specimens s JOIN labs l ON l.id = s.lab_id"""


def list_specimens(
    conn: psycopg.Connection,
    principal: Principal,
    *,
    lab: str | None = None,
    role: str | None = None,
) -> list[dict]:
    """Specimens the caller sees, by lab and code; ``lab`` and ``role`` filter."""
    if role is not None:
        check_role(role)
    lab_id = _lab_id(conn, principal, lab) if lab is not None else None
    return conn.execute(
        _SPECIMENS
        + """ WHERE (%(all)s OR s.lab_id = ANY(%(labs)s))
                AND (%(lab)s::bigint IS NULL OR s.lab_id = %(lab)s)
                AND (%(role)s::text IS NULL OR s.role = %(role)s)
              ORDER BY l.code, s.code""",
        {"all": principal.all_labs, "labs": principal.lab_list(), "lab": lab_id, "role": role},
    ).fetchall()


def set_role(
    conn: psycopg.Connection,
    principal: Principal,
    lab: str,
    specimen: str,
    role: str,
    *,
    force: bool = False,
) -> dict:
    """Give a specimen a new role: ``{"specimen", "changed", "invalidated"}`` (see the
    module doc for what is refused and what a forced change withdraws)."""
    check_role(role)
    check_code(specimen, field="specimen")
    lab_id = _lab_id(conn, principal, lab)
    row = conn.execute(
        "SELECT id, role FROM specimens WHERE lab_id = %s AND code = %s FOR UPDATE",
        (lab_id, specimen),
    ).fetchone()
    if row is None:
        raise NotFound(f"specimen {specimen!r} of lab {lab!r} does not exist", field="specimen")
    if row["role"] == role:
        return {"specimen": _specimen(conn, row["id"]), "changed": False, "invalidated": {}}
    uses = usage(conn, row["id"])
    if not force and any(uses.values()):
        raise Conflict(
            f"specimen {lab}/{specimen} is in use as a {row['role']} specimen: "
            f"{describe(uses)}; changing it to {role} would move those cells between "
            "training and test: pass force to change it anyway (that invalidates them)",
            field="role",
        )
    invalidated = {
        **uses,
        "labels_withdrawn": _withdraw_labels(conn, row["id"], ALLOWED_SOURCES[role]),
        "open_tasks_cancelled": _cancel_tasks(conn, row["id"], ALLOWED_TASKS[role]),
    }
    conn.execute("UPDATE specimens SET role = %s WHERE id = %s", (role, row["id"]))
    audit.record(
        conn,
        "specimen.set_role",
        "specimen",
        f"{lab}/{specimen}",
        {"force": force, "invalidated": invalidated},
        actor=principal,
        before={"role": row["role"]},
        after={"role": role},
    )
    return {"specimen": _specimen(conn, row["id"]), "changed": True, "invalidated": invalidated}


def _specimen(conn: psycopg.Connection, specimen_id: int) -> dict:
    return conn.execute(_SPECIMENS + " WHERE s.id = %s", (specimen_id,)).fetchone()


def usage(conn: psycopg.Connection, specimen_id: int) -> dict:
    """What already uses a specimen's cells: label counts by split, and the model
    versions whose succeeded training job had one of its cells in its lists."""
    counts = conn.execute(
        """SELECT count(*) FILTER (WHERE l.source = ANY(%s)) AS training_labels,
                  count(*) FILTER (WHERE l.source = 'validation') AS validation_labels,
                  count(*) FILTER (WHERE l.source = 'test') AS test_labels
             FROM labels l JOIN cells c ON c.id = l.cell_id WHERE c.specimen_id = %s""",
        (list(TRAINING_SOURCES), specimen_id),
    ).fetchone()
    versions = conn.execute(
        """SELECT DISTINCT j.model_version FROM training_jobs j
            WHERE j.state = 'succeeded' AND j.model_version IS NOT NULL
              AND EXISTS (
                  SELECT 1 FROM jsonb_array_elements(
                           coalesce(j.config->'train', '[]') || coalesce(j.config->'validation', '[]')
                           || coalesce(j.config->'test', '[]')) item
                    JOIN cells c ON c.id = (item->>2)::bigint
                   WHERE c.specimen_id = %s)
            ORDER BY 1""",
        (specimen_id,),
    ).fetchall()
    return {**counts, "model_versions": [r["model_version"] for r in versions]}


def describe(uses: dict) -> str:
    """``uses`` in words: '3 training labels, 1 test label, model versions 2, 3'."""
    parts = []
    for key, noun in (
        ("training_labels", "training label"),
        ("validation_labels", "validation label"),
        ("test_labels", "test label"),
    ):
        if uses[key]:
            parts.append(f"{uses[key]} {noun}{'s' if uses[key] != 1 else ''}")
    if uses["model_versions"]:
        parts.append(
            "cells trained on by model version(s) " + ", ".join(map(str, uses["model_versions"]))
        )
    return ", ".join(parts) or "nothing"


def _withdraw_labels(conn: psycopg.Connection, specimen_id: int, allowed: frozenset[str]) -> int:
    """Delete the specimen's labels of sources ``allowed`` does not hold; their cells
    go back to the pool, and each label's values stay in its audit row."""
    rows = conn.execute(
        """DELETE FROM labels l USING cells c
            WHERE c.id = l.cell_id AND c.specimen_id = %s AND NOT l.source = ANY(%s)
        RETURNING l.cell_id, l.class_code, l.source, l.round_added""",
        (specimen_id, sorted(allowed)),
    ).fetchall()
    ids = [r["cell_id"] for r in rows]
    conn.execute(
        "UPDATE cells SET status = 'unlabelled' WHERE id = ANY(%s) AND status = 'labelled'", (ids,)
    )
    for r in rows:
        audit.record(
            conn,
            "label.withdraw",
            "cell",
            r["cell_id"],
            {"reason": "specimen role change"},
            before={k: r[k] for k in ("class_code", "source", "round_added")},
        )
    return len(rows)


def _cancel_tasks(conn: psycopg.Connection, specimen_id: int, allowed: frozenset[str]) -> int:
    """Cancel the specimen's unanswered review tasks of kinds ``allowed`` does not hold;
    their cells go back to the pool."""
    rows = conn.execute(
        """UPDATE review_tasks t SET state = 'cancelled', lease_owner = NULL,
                  lease_token = NULL, lease_expires_at = NULL
             FROM cells c
            WHERE c.id = t.cell_id AND c.specimen_id = %s AND t.state IN ('open', 'leased')
              AND NOT t.kind = ANY(%s)
        RETURNING t.cell_id""",
        (specimen_id, sorted(allowed)),
    ).fetchall()
    ids = [r["cell_id"] for r in rows]
    conn.execute(
        "UPDATE cells SET status = 'unlabelled' WHERE id = ANY(%s) AND status = 'pending'", (ids,)
    )
    return len(rows)
