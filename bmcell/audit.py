"""The audit trail: who changed what, appended in the transaction of the change.

Every state-changing call records one ``audit_log`` row with :func:`record`, on the
connection of its own transaction, so the change and its row commit together or not
at all. The table is append-only (migration 0007: a trigger refuses UPDATE, DELETE
and TRUNCATE, whoever connects).

Who acted (:class:`Actor`) is, in this order: the ``actor`` the caller passes (the
labeling API passes its request's principal); the principal of the call in progress
(:func:`bmcell.auth.current_principal`, set for every gRPC call); or the process
itself (``service:<name>`` for a service's own background work, ``cli:<login>`` for a
command with direct database access), never nobody. Names and roles are copied into
the row, so history reads as it was when a user is renamed or disabled later.

:func:`search` and the parsers behind ``bmcell audit`` read it back, newest first.
"""

from __future__ import annotations

import getpass
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
from psycopg.types.json import Jsonb

from bmcell.auth import Principal, current_principal
from bmcell.errors import InvalidArgument

ACTOR_KINDS = ("person", "service", "process")
_ACTION = re.compile(r"^[a-z][a-z_]*\.[a-z][a-z_]*$")
_ENTITY = re.compile(r"^[a-z][a-z_]{0,62}$")
MAX_ENTITY_ID = 200
MAX_LIMIT = 10_000
_INSERT = """INSERT INTO audit_log (actor_id, actor_kind, actor_name, actor_role, request_id,
                                   action, entity, entity_id, before, after, detail)
             VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"""


@dataclass(frozen=True)
class Actor:
    kind: str
    name: str
    user_id: int | None = None
    role: str | None = None

    @classmethod
    def of(cls, principal: Principal) -> Actor:
        kind = "service" if principal.role == "service" else "person"
        return cls(kind, principal.name, principal.user_id, principal.role)


_process = Actor("process", "service:bmcell")
_request_id: ContextVar[str | None] = ContextVar("bmcell_request_id", default=None)


def set_process_identity(name: str) -> None:
    """Who this process is when it acts with no caller: ``service:<name>`` for a
    service (set by :func:`bmcell.runtime.boot`), or a full ``kind:name`` (the CLI)."""
    global _process
    _process = Actor("process", name if ":" in name else f"service:{name}")


def cli_identity() -> str:
    """A command run at a shell acts as the login that ran it."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "cli:unknown"


def acting() -> Actor:
    """Who the current code acts for: the call's principal, else the process."""
    principal = current_principal()
    return Actor.of(principal) if principal is not None else _process


def current_request_id() -> str | None:
    """The id of the request in progress, when a transport set one."""
    return _request_id.get()


@contextmanager
def request_scope(request_id: str) -> Iterator[str]:
    """Rows recorded inside the block carry ``request_id`` (set by the transports)."""
    reset = _request_id.set(request_id)
    try:
        yield request_id
    finally:
        _request_id.reset(reset)


def record(
    conn: psycopg.Connection,
    action: str,
    entity: str,
    entity_id: object,
    detail: dict | None = None,
    *,
    actor: Actor | Principal | None = None,
    before: dict | None = None,
    after: dict | None = None,
) -> int:
    """Append one row in ``conn``'s transaction; returns its id.

    ``action`` is ``noun.verb`` (``round.start``); ``entity``/``entity_id`` name what
    changed, as ``bmcell audit --entity ENTITY:ID`` finds it; ``before``/``after`` hold
    the changed values, ``detail`` anything else worth keeping.
    """
    _check_names(action, entity)
    values = _values(_who(actor), action, entity, entity_id, before, after, detail)
    row = conn.execute(_INSERT + " RETURNING id", values).fetchone()
    return row["id"] if isinstance(row, dict) else row[0]


def record_each(
    conn: psycopg.Connection,
    action: str,
    entity: str,
    entity_ids: list[object],
    detail: dict | None = None,
    *,
    actor: Actor | Principal | None = None,
    before: dict | None = None,
    after: dict | None = None,
) -> None:
    """One row per entity for one change to many (a split of hundreds of cells), sent
    in one batch."""
    if not entity_ids:
        return
    _check_names(action, entity)
    who = _who(actor)
    with conn.cursor() as cur:
        cur.executemany(
            _INSERT, [_values(who, action, entity, i, before, after, detail) for i in entity_ids]
        )


def _check_names(action: str, entity: str) -> None:
    if not _ACTION.match(action):
        raise ValueError(f"audit action {action!r} must look like 'noun.verb'")
    if not _ENTITY.match(entity):
        raise ValueError(f"audit entity {entity!r} must be a lower-case word")


def _who(actor: Actor | Principal | None) -> Actor:
    if isinstance(actor, Principal):
        return Actor.of(actor)
    return actor or acting()


def _values(
    who: Actor,
    action: str,
    entity: str,
    entity_id: object,
    before: dict | None,
    after: dict | None,
    detail: dict | None,
) -> tuple:
    return (
        who.user_id,
        who.kind,
        who.name,
        who.role,
        _request_id.get(),
        action,
        entity,
        str(entity_id),
        _json(before),
        _json(after),
        _json(detail),
    )


def _json(value: dict | None) -> Jsonb | None:
    return None if value is None else Jsonb(value)


# --- reading it back ---------------------------------------------------------------------


def parse_entity(text: str) -> tuple[str, str | None]:
    """``cell:123`` -> ("cell", "123"); a bare ``cell`` matches every cell."""
    entity, sep, entity_id = text.partition(":")
    if not _ENTITY.match(entity) or (sep and not entity_id) or len(entity_id) > MAX_ENTITY_ID:
        raise InvalidArgument(
            f"{text!r} is not ENTITY:ID (like cell:123, model_version:bmcell-cell/3) "
            "or a bare ENTITY (like round)",
            field="entity",
        )
    return entity, entity_id if sep else None


def parse_since(text: str) -> datetime:
    """An ISO 8601 time; without an offset it is UTC."""
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(
            f"{text!r} is not an ISO 8601 time like 2026-12-01T00:00 (UTC) "
            "or 2026-12-01T00:00+01:00",
            field="since",
        ) from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def search(
    conn: psycopg.Connection,
    *,
    entity: str | None = None,
    entity_id: str | None = None,
    actor: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> list[dict]:
    """Rows matching every filter given, newest first.

    ``actor`` is a name as recorded (``ana``, ``service:trainer``); a person's current
    name also finds the rows they wrote under an earlier one.
    """
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidArgument(f"must be 1 to {MAX_LIMIT}, got {limit}", field="limit")
    return conn.execute(
        """SELECT id, at, actor_kind, actor_name, actor_role, actor_id, request_id,
                  action, entity, entity_id, before, after, detail
             FROM audit_log
            WHERE (%(entity)s::text IS NULL OR entity = %(entity)s)
              AND (%(entity_id)s::text IS NULL OR entity_id = %(entity_id)s)
              AND (%(actor)s::text IS NULL OR actor_name = %(actor)s
                   OR actor_id = (SELECT id FROM users WHERE name = %(actor)s))
              AND (%(since)s::timestamptz IS NULL OR at >= %(since)s)
            ORDER BY at DESC, id DESC
            LIMIT %(limit)s""",
        {
            "entity": entity,
            "entity_id": entity_id,
            "actor": actor,
            "since": since,
            "limit": limit,
        },
    ).fetchall()
