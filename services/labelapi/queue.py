"""The review queue: leasing tasks to reviewers, recording answers, settling outcomes.

A task is ``open`` until a reviewer leases it; the lease (a random token) lasts
``lease_seconds``. An expired lease counts as open: the next lease call takes it over,
so abandoned work returns to the queue without a sweeper. Leasing uses
``FOR UPDATE SKIP LOCKED``, so concurrent reviewers never wait on, nor receive, the
same row.

A task needs ``required_reviews`` answers from different people (1 for CST and AL,
k for initial, validation and test labelling). When the last one arrives:
all agree on a class -> label; all say "too difficult" -> the cell is 'difficult';
otherwise an ``adjudication`` task goes to an admin, whose answer is final.
Submitting is idempotent: ``reviews.lease_token`` is unique, so a repeated submit
finds its review and reports the same outcome. A page of tasks (the reviewer's gallery)
is many leases taken at once, each answered by its own submit. Releasing a lease is a
skip: the task is not that reviewer's again for ``skip_seconds``, and then only after
every other.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from uuid import UUID

import psycopg

from bmcell import audit
from bmcell.auth import Principal
from bmcell.errors import Conflict, InvalidArgument, NotFound
from bmcell.taxonomy import Taxonomy
from services.labelapi import labels

REVIEW_KINDS = ("cst", "al", "initial", "validation", "test", "adjudication")
BOOTSTRAP_KINDS = ("initial", "validation", "test")

# Tasks the caller may see: %(all)s is true for operators/admins, else lab ids in %(scope)s.
_SCOPE = "(%(all)s OR c.lab_id = ANY(%(scope)s))"
_AVAILABLE = "(t.state = 'open' OR (t.state = 'leased' AND t.lease_expires_at <= now()))"

_TASK_VIEW = """
SELECT t.id, t.round_id, t.cell_id, t.kind, t.suggested_class, t.top_classes,
       t.top_probabilities, t.required_reviews, t.state, t.lease_owner, t.lease_token,
       t.lease_expires_at, t.leased_at, t.done_at,
       (SELECT count(*) FROM reviews r WHERE r.task_id = t.id) AS reviews_so_far,
       r.number AS round_number, r.experiment,
       c.lab_id, lab.code AS lab, s.code AS specimen, s.is_test, c.field_id, c.index_in_field,
       c.x0, c.y0, c.x1, c.y1, c.cell_area, c.nucleus_area, c.nucleus_cell_ratio,
       c.nucleus_axis_ratio, c.nucleus_width_ratio, c.status AS cell_status, f.um_per_px
  FROM review_tasks t
  JOIN cells c ON c.id = t.cell_id
  LEFT JOIN field_images f ON f.id = c.field_id  -- imported crops have no field
  JOIN labs lab ON lab.id = c.lab_id
  JOIN specimens s ON s.id = c.specimen_id
  LEFT JOIN rounds r ON r.id = t.round_id
 WHERE t.id = %(id)s
"""


def _scope(principal: Principal) -> dict:
    return {"all": principal.all_labs, "scope": principal.lab_list()}


@dataclass(frozen=True)
class Lease:
    task: dict
    # The task was leased to someone else whose lease had run out.
    took_over_expired: bool
    resumed: bool


def task_view(conn: psycopg.Connection, principal: Principal, task_id: int) -> dict:
    row = conn.execute(_TASK_VIEW, {"id": task_id}).fetchone()
    if row is None or not principal.sees_lab(row["lab_id"]):
        raise NotFound(f"task {task_id} does not exist", field="task_id")
    return dict(row)


def _lease_params(
    principal: Principal,
    lease_seconds: int,
    kind: str | None,
    lab_ids: list[int] | None,
    suggested: str | None,
    skip_seconds: int,
) -> dict:
    if kind == "adjudication" and principal.role != "admin":
        raise InvalidArgument("only admins adjudicate", field="kind")
    return {
        **_scope(principal),
        "uid": principal.user_id,
        "kind": kind,
        "labs": lab_ids,
        "suggested": suggested,
        "admin": principal.role == "admin",
        "secs": lease_seconds,
        "skip_secs": skip_seconds,
    }


_FILTERS = f"""{_SCOPE}
        AND (%(kind)s::text IS NULL OR t.kind = %(kind)s)
        AND (%(labs)s::bigint[] IS NULL OR c.lab_id = ANY(%(labs)s))
        AND (%(suggested)s::text IS NULL OR t.suggested_class = %(suggested)s)
        AND (t.kind <> 'adjudication' OR %(admin)s)"""


def _held(conn: psycopg.Connection, params: dict, limit: int) -> list[int]:
    """Live leases the caller holds that match the filters, oldest task first."""
    rows = conn.execute(
        f"""SELECT t.id FROM review_tasks t JOIN cells c ON c.id = t.cell_id
             WHERE t.state = 'leased' AND t.lease_owner = %(uid)s
               AND t.lease_expires_at > now() AND {_FILTERS}
             ORDER BY t.id LIMIT %(n)s""",
        {**params, "n": limit},
    ).fetchall()
    return [r["id"] for r in rows]


def _take(conn: psycopg.Connection, params: dict, limit: int) -> list[dict]:
    """Lease up to ``limit`` available tasks, oldest first. A task the caller skipped is
    not theirs again for ``skip_seconds`` (so the colleague gets it), and after that comes
    behind the rest; everyone else's order is as ever."""
    return conn.execute(
        f"""WITH candidate AS (
                SELECT t.id, t.state AS prev_state
                  FROM review_tasks t JOIN cells c ON c.id = t.cell_id
                 WHERE {_AVAILABLE} AND {_FILTERS}
                   AND NOT EXISTS (SELECT 1 FROM reviews r
                                    WHERE r.task_id = t.id AND r.reviewer_id = %(uid)s)
                   AND NOT EXISTS (SELECT 1 FROM review_skips k
                                    WHERE k.task_id = t.id AND k.reviewer_id = %(uid)s
                                      AND k.skipped_at > now()
                                          - make_interval(secs => %(skip_secs)s))
                 ORDER BY EXISTS (SELECT 1 FROM review_skips k
                                   WHERE k.task_id = t.id AND k.reviewer_id = %(uid)s),
                          t.id
                 LIMIT %(n)s
                   FOR UPDATE OF t SKIP LOCKED)
            UPDATE review_tasks t
               SET state = 'leased', lease_owner = %(uid)s, lease_token = gen_random_uuid(),
                   leased_at = now(),
                   lease_expires_at = now() + make_interval(secs => %(secs)s)
              FROM candidate
             WHERE t.id = candidate.id
         RETURNING t.id, candidate.prev_state""",
        {**params, "n": limit},
    ).fetchall()


def lease_next(
    conn: psycopg.Connection,
    principal: Principal,
    lease_seconds: int,
    *,
    kind: str | None = None,
    lab_ids: list[int] | None = None,
    suggested: str | None = None,
    skip_seconds: int = 0,
) -> Lease | None:
    """Lease the oldest task the caller may answer; None when there is none.

    A caller who still holds a live lease gets that task back (a reloaded page resumes
    its task rather than stranding it until expiry).
    """
    params = _lease_params(principal, lease_seconds, kind, lab_ids, suggested, skip_seconds)
    held = _held(conn, params, 1)
    if held:
        return Lease(task_view(conn, principal, held[0]), False, True)
    rows = _take(conn, params, 1)
    if not rows:
        return None
    return Lease(
        task_view(conn, principal, rows[0]["id"]), rows[0]["prev_state"] == "leased", False
    )


def lease_page(
    conn: psycopg.Connection,
    principal: Principal,
    lease_seconds: int,
    size: int,
    *,
    kind: str | None = None,
    lab_ids: list[int] | None = None,
    suggested: str | None = None,
    skip_seconds: int = 0,
) -> list[Lease]:
    """Lease up to ``size`` tasks at once: the caller's live leases that match first
    (a reloaded page resumes them), then the oldest available.

    A page of CST tasks shares one suggested class, so it can be verified as a gallery:
    ``suggested`` when given, else the class of the caller's oldest held CST lease, else
    of the oldest available CST task. Each task keeps its own lease and is answered by
    its own submit.
    """
    params = _lease_params(principal, lease_seconds, kind, lab_ids, suggested, skip_seconds)
    if kind == "cst" and suggested is None:
        params["suggested"] = _page_class(conn, params)
        if params["suggested"] is None:
            return []
    held = _held(conn, params, size)
    leases = [Lease(task_view(conn, principal, i), False, True) for i in held]
    if len(held) < size:
        for row in _take(conn, params, size - len(held)):
            leases.append(
                Lease(task_view(conn, principal, row["id"]), row["prev_state"] == "leased", False)
            )
    return leases


def _page_class(conn: psycopg.Connection, params: dict) -> str | None:
    row = conn.execute(
        f"""SELECT t.suggested_class FROM review_tasks t JOIN cells c ON c.id = t.cell_id
             WHERE t.suggested_class IS NOT NULL AND {_FILTERS}
               AND ((t.state = 'leased' AND t.lease_owner = %(uid)s
                     AND t.lease_expires_at > now())
                    OR ({_AVAILABLE} AND NOT EXISTS (
                        SELECT 1 FROM reviews r
                         WHERE r.task_id = t.id AND r.reviewer_id = %(uid)s)))
             ORDER BY (t.state = 'leased' AND t.lease_owner = %(uid)s) DESC, t.id
             LIMIT 1""",
        params,
    ).fetchone()
    return row["suggested_class"] if row else None


@dataclass(frozen=True)
class Outcome:
    task_id: int
    kind: str
    # recorded: more answers needed; labelled; difficult; adjudication: sent to an admin.
    status: str
    reviews: int
    required_reviews: int
    class_code: str | None = None
    adjudication_task_id: int | None = None
    # The same lease token was submitted before; nothing new was written.
    replayed: bool = False
    # Seconds between lease and answer, measured by the server.
    seconds: float | None = None


def _answer_class(
    task: dict, taxonomy: Taxonomy, answer: str, class_code: str | None
) -> str | None:
    if answer == "difficult":
        if class_code is not None:
            raise InvalidArgument(
                "must be empty when the answer is 'difficult'", field="class_code"
            )
        return None
    if answer == "confirm":
        suggestion = task["suggested_class"] or (
            task["top_classes"][0] if task["top_classes"] else None
        )
        if suggestion is None:
            raise InvalidArgument(
                f"task {task['id']} has no suggestion to confirm; answer 'correct' with a class_code",
                field="answer",
            )
        if class_code is not None and class_code != suggestion:
            raise InvalidArgument(
                f"'confirm' takes the suggestion {suggestion!r}, not {class_code!r}; "
                "answer 'correct' to give another class",
                field="class_code",
            )
        return suggestion
    return labels.check_class(taxonomy, class_code)


def _source_and_round(conn: psycopg.Connection, task: dict) -> tuple[str, int]:
    kind = task["kind"]
    if kind == "adjudication":
        original = conn.execute(
            """SELECT kind FROM review_tasks
                WHERE cell_id = %s AND kind <> 'adjudication'
                  AND round_id IS NOT DISTINCT FROM %s
                ORDER BY id DESC LIMIT 1""",
            (task["cell_id"], task["round_id"]),
        ).fetchone()
        kind = original["kind"] if original else "initial"
    return kind, task["round_number"] or 0


def _outcome_of(reviews: list[dict]) -> tuple[str, dict]:
    """What a finished task's answers amount to, and for disagreement the vote."""
    verdicts = Counter(r["class_code"] or "difficult" for r in reviews)
    if len(verdicts) == 1:
        verdict = next(iter(verdicts))
        return ("difficult" if verdict == "difficult" else "labelled"), {"class_code": verdict}
    return "adjudication", dict(verdicts)


def submit(
    conn: psycopg.Connection,
    principal: Principal,
    taxonomy: Taxonomy,
    task_id: int,
    lease_token: UUID,
    answer: str,
    class_code: str | None,
) -> Outcome:
    locked = conn.execute(
        """SELECT t.id, c.lab_id, t.lease_expires_at <= now() AS lease_expired
             FROM review_tasks t JOIN cells c ON c.id = t.cell_id
            WHERE t.id = %s FOR UPDATE OF t""",
        (task_id,),
    ).fetchone()
    if locked is None or not principal.sees_lab(locked["lab_id"]):
        raise NotFound(f"task {task_id} does not exist", field="task_id")
    task = task_view(conn, principal, task_id)

    prior = conn.execute(
        "SELECT task_id, reviewer_id, class_code, seconds FROM reviews WHERE lease_token = %s",
        (lease_token,),
    ).fetchone()
    if prior is not None:
        if prior["task_id"] != task_id or prior["reviewer_id"] != principal.user_id:
            raise Conflict("lease_token was used for another task", field="lease_token")
        return _replayed(conn, task, prior)

    if task["state"] != "leased" or task["lease_token"] != lease_token:
        raise Conflict(
            f"lease is no longer held: task {task_id} is {task['state']}"
            + (" under another lease" if task["state"] == "leased" else ""),
            field="lease_token",
        )
    if task["lease_owner"] != principal.user_id:
        raise Conflict(f"task {task_id} is leased to someone else", field="lease_token")
    if locked["lease_expired"]:
        raise Conflict(
            f"lease expired at {task['lease_expires_at'].isoformat()}", field="lease_token"
        )
    chosen = _answer_class(task, taxonomy, answer, class_code)

    review = conn.execute(
        """INSERT INTO reviews (task_id, reviewer_id, lease_token, answer, class_code, seconds)
           VALUES (%s, %s, %s, %s, %s, EXTRACT(EPOCH FROM now() - %s))
           RETURNING seconds""",
        (task_id, principal.user_id, lease_token, answer, chosen, task["leased_at"]),
    ).fetchone()
    audit.record(
        conn,
        "review.answer",
        "review_task",
        task_id,
        {"answer": answer, "class_code": chosen, "cell_id": task["cell_id"]},
        actor=principal,
    )
    reviews = conn.execute(
        "SELECT reviewer_id, answer, class_code FROM reviews WHERE task_id = %s ORDER BY id",
        (task_id,),
    ).fetchall()
    base = {
        "task_id": task_id,
        "kind": task["kind"],
        "reviews": len(reviews),
        "required_reviews": task["required_reviews"],
        "seconds": review["seconds"],
    }
    if len(reviews) < task["required_reviews"]:
        conn.execute(
            """UPDATE review_tasks SET state = 'open', lease_owner = NULL, lease_token = NULL,
                      lease_expires_at = NULL, leased_at = NULL
                WHERE id = %s""",
            (task_id,),
        )
        return Outcome(status="recorded", **base)

    conn.execute(
        """UPDATE review_tasks SET state = 'done', done_at = now(), lease_owner = NULL,
                  lease_token = NULL, lease_expires_at = NULL
            WHERE id = %s""",
        (task_id,),
    )
    status, detail = _outcome_of(reviews)
    if status == "labelled":
        source, round_added = _source_and_round(conn, task)
        labels.set_label(
            conn,
            cell_id=task["cell_id"],
            class_code=detail["class_code"],
            source=source,
            round_id=task["round_id"],
            round_added=round_added,
            reviewer=principal,
            task_id=task_id,
        )
        return Outcome(status=status, class_code=detail["class_code"], **base)
    if status == "difficult":
        labels.mark_difficult(conn, cell_id=task["cell_id"], reviewer=principal, task_id=task_id)
        return Outcome(status=status, **base)
    classes = sorted((c for c in detail if c != "difficult"), key=lambda c: -detail[c])
    adjudication = conn.execute(
        """INSERT INTO review_tasks (round_id, cell_id, kind, top_classes, top_probabilities)
           VALUES (%s, %s, 'adjudication', %s, %s) RETURNING id""",
        (
            task["round_id"],
            task["cell_id"],
            classes,
            [detail[c] / len(reviews) for c in classes],
        ),
    ).fetchone()
    return Outcome(status=status, adjudication_task_id=adjudication["id"], **base)


def _replayed(conn: psycopg.Connection, task: dict, prior: dict) -> Outcome:
    """The outcome a repeated submit reports, read back from what the first one wrote."""
    n = task["reviews_so_far"]
    base = {
        "task_id": task["id"],
        "kind": task["kind"],
        "reviews": n,
        "required_reviews": task["required_reviews"],
        "replayed": True,
        "seconds": prior["seconds"],
    }
    if task["state"] != "done":
        return Outcome(status="recorded", **base)
    if task["cell_status"] == "difficult":
        return Outcome(status="difficult", **base)
    adjudication = conn.execute(
        """SELECT id FROM review_tasks WHERE cell_id = %s AND kind = 'adjudication'
              AND id > %s ORDER BY id LIMIT 1""",
        (task["cell_id"], task["id"]),
    ).fetchone()
    if adjudication is not None:
        return Outcome(status="adjudication", adjudication_task_id=adjudication["id"], **base)
    return Outcome(status="labelled", class_code=prior["class_code"], **base)


def release(
    conn: psycopg.Connection, principal: Principal, task_id: int, lease_token: UUID
) -> None:
    task = task_view(conn, principal, task_id)
    cur = conn.execute(
        """UPDATE review_tasks SET state = 'open', lease_owner = NULL, lease_token = NULL,
                  lease_expires_at = NULL, leased_at = NULL
            WHERE id = %s AND state = 'leased' AND lease_token = %s AND lease_owner = %s""",
        (task_id, lease_token, principal.user_id),
    )
    if cur.rowcount == 0:
        raise Conflict(
            f"lease is no longer held: task {task_id} is {task['state']}", field="lease_token"
        )
    # A skip: the caller's next leases pass over this task while others remain.
    conn.execute(
        """INSERT INTO review_skips (task_id, reviewer_id) VALUES (%s, %s)
           ON CONFLICT (task_id, reviewer_id) DO UPDATE SET skipped_at = now()""",
        (task_id, principal.user_id),
    )
    audit.record(
        conn, "review.skip", "review_task", task_id, {"cell_id": task["cell_id"]}, actor=principal
    )


def create_bootstrap_tasks(
    conn: psycopg.Connection,
    principal: Principal,
    *,
    kind: str,
    cell_ids: list[int],
    required_reviews: int,
    round_id: int | None,
) -> dict:
    """Initial, validation or test labelling tasks for unlabelled cells in scope.

    Cells that are not in the pool (already labelled, pending, difficult, excluded, or
    of an excluded specimen) are skipped and reported, so calling twice with the same cells creates nothing new.
    """
    if kind not in BOOTSTRAP_KINDS:
        raise InvalidArgument(f"kind {kind!r} is not one of {BOOTSTRAP_KINDS}", field="kind")
    if (
        round_id is not None
        and not conn.execute("SELECT 1 FROM rounds WHERE id = %s", (round_id,)).fetchone()
    ):
        raise NotFound(f"round {round_id} does not exist", field="round_id")
    found = conn.execute(
        f"""SELECT c.id FROM cells c WHERE c.id = ANY(%(ids)s) AND {_SCOPE}""",
        {"ids": cell_ids, **_scope(principal)},
    ).fetchall()
    missing = sorted(set(cell_ids) - {r["id"] for r in found})
    if missing:
        raise NotFound(f"cell {missing[0]} does not exist", field="cell_ids")
    created = conn.execute(
        """WITH pool AS (
               UPDATE cells SET status = 'pending'
                WHERE id = ANY(%s) AND status = 'unlabelled'
                  AND specimen_id NOT IN (SELECT id FROM specimens WHERE role = 'excluded')
               RETURNING id)
           INSERT INTO review_tasks (round_id, cell_id, kind, required_reviews)
           SELECT %s, id, %s, %s FROM pool ORDER BY id
           RETURNING id, cell_id""",
        (cell_ids, round_id, kind, required_reviews),
    ).fetchall()
    made = {r["cell_id"] for r in created}
    if created:
        audit.record(
            conn,
            "review_tasks.create",
            "round",
            round_id or "none",
            {"kind": kind, "tasks": len(created), "required_reviews": required_reviews},
            actor=principal,
        )
    return {
        "created": [r["id"] for r in created],
        "skipped_cells": sorted(set(cell_ids) - made),
    }


def backlog(conn: psycopg.Connection) -> dict[str, int]:
    """Tasks not yet answered (open or leased), by kind."""
    rows = conn.execute(
        "SELECT kind, count(*) AS n FROM review_tasks WHERE state IN ('open', 'leased') "
        "GROUP BY kind"
    ).fetchall()
    counts = dict.fromkeys(REVIEW_KINDS, 0)
    counts.update({r["kind"]: r["n"] for r in rows})
    return counts


def progress(conn: psycopg.Connection, principal: Principal, round_id: int | None) -> dict:
    """Counts of the round's tasks in the caller's labs, by kind and state.

    Without ``round_id``: the newest round that has tasks in the caller's labs; when
    none has, the tasks outside any round (initial labelling).
    """
    scope = _scope(principal)
    if round_id is None:
        row = conn.execute(
            f"""SELECT t.round_id FROM review_tasks t JOIN cells c ON c.id = t.cell_id
                 WHERE t.round_id IS NOT NULL AND {_SCOPE}
                 ORDER BY t.round_id DESC LIMIT 1""",
            scope,
        ).fetchone()
        round_id = row["round_id"] if row else None
    rnd = None
    if round_id is not None:
        rnd = conn.execute(
            "SELECT id, experiment, number, strategy, state FROM rounds WHERE id = %s",
            (round_id,),
        ).fetchone()
        if rnd is None:
            raise NotFound(f"round {round_id} does not exist", field="round_id")
    rows = conn.execute(
        f"""SELECT t.kind,
                   CASE WHEN t.state = 'leased' AND t.lease_expires_at <= now() THEN 'open'
                        ELSE t.state END AS state,
                   count(*) AS n
              FROM review_tasks t JOIN cells c ON c.id = t.cell_id
             WHERE t.round_id IS NOT DISTINCT FROM %(round)s AND {_SCOPE}
             GROUP BY 1, 2""",
        {"round": round_id, **scope},
    ).fetchall()
    by_kind: dict[str, dict[str, int]] = {}
    for r in rows:
        by_kind.setdefault(r["kind"], dict.fromkeys(("open", "leased", "done", "cancelled"), 0))
        by_kind[r["kind"]][r["state"]] += r["n"]
    mine = conn.execute(
        """SELECT count(*) AS n FROM reviews rv JOIN review_tasks t ON t.id = rv.task_id
            WHERE rv.reviewer_id = %s AND t.round_id IS NOT DISTINCT FROM %s""",
        (principal.user_id, round_id),
    ).fetchone()["n"]
    total = sum(sum(v.values()) for v in by_kind.values())
    done = sum(v["done"] for v in by_kind.values())
    return {
        "round": dict(rnd) if rnd else None,
        "by_kind": by_kind,
        "total": total,
        "done": done,
        "remaining": total - done - sum(v["cancelled"] for v in by_kind.values()),
        "mine": mine,
    }
