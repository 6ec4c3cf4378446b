"""Postgres access: one connection pool per process and the migration runner.

Migrations are the ordered ``bmcell/migrations/NNNN_name.sql`` files. Each is applied
once, in its own transaction, and recorded in ``schema_migrations`` with its checksum.
A session-level advisory lock serialises runners, so several services starting at the
same moment apply the schema exactly once; a changed file that was already applied is
refused rather than silently skipped.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from bmcell import log
from bmcell.errors import ConfigError, Unavailable
from bmcell.settings import Settings

_LOG = log.get(__name__)
# Arbitrary constant shared by every bmcell process: "bmcell" as an int8 key.
_MIGRATION_LOCK_KEY = int.from_bytes(b"bmcell\0\0", "big") >> 1
# How long a call waits for a pooled connection while Postgres is known to be down.
OUTAGE_WAIT_S = 2.0


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations() -> list[Migration]:
    files = sorted(
        (f for f in resources.files("bmcell.migrations").iterdir() if f.name.endswith(".sql")),
        key=lambda f: f.name,
    )
    found = []
    for f in files:
        version, _, name = f.name.removesuffix(".sql").partition("_")
        if not version.isdigit():
            raise ConfigError(
                f"migration file {f.name!r} must start with a number, e.g. 0002_x.sql"
            )
        found.append(Migration(version, name, f.read_text()))
    return found


def migrate(conninfo: str) -> list[str]:
    """Apply pending migrations; returns the versions this call applied."""
    applied_now: list[str] = []
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK_KEY,))
        try:
            conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version text PRIMARY KEY,
                       name text NOT NULL,
                       checksum text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = dict(conn.execute("SELECT version, checksum FROM schema_migrations").fetchall())
            for m in migrations():
                if m.version in done:
                    if done[m.version] != m.checksum:
                        raise ConfigError(
                            f"migration {m.version}_{m.name} changed after it was applied; "
                            "add a new migration instead of editing an applied one"
                        )
                    continue
                with conn.transaction():
                    conn.execute(m.sql)
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                        (m.version, m.name, m.checksum),
                    )
                applied_now.append(m.version)
                _LOG.info("migration applied", version=m.version, name=m.name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK_KEY,))
    return applied_now


class Database:
    """A psycopg 3 pool; rows come back as dicts."""

    def __init__(self, settings: Settings, *, name: str = "bmcell") -> None:
        self.conninfo = settings.database_url
        self.pool = ConnectionPool(
            settings.database_url,
            min_size=settings.db_pool_min,
            max_size=settings.db_pool_max,
            kwargs={"row_factory": dict_row},
            name=name,
            open=False,
            # A connection that sat idle through a Postgres restart is dead: test each
            # one as it leaves the pool (an empty query) and replace it, so the first
            # call after an outage is served instead of failing.
            check=ConnectionPool.check_connection,
        )
        self._down = threading.Event()  # the last call found Postgres unreachable

    def open(self, timeout_s: float = 30.0) -> Database:
        try:
            self.pool.open(wait=True, timeout=timeout_s)
        except psycopg.OperationalError as exc:  # pool timeout subclasses this
            raise Unavailable(
                "Postgres at BMCELL_DATABASE_URL is not reachable", detail=str(exc)
            ) from exc
        return self

    def close(self) -> None:
        self.pool.close()

    @contextmanager
    def connection(self, timeout_s: float | None = None) -> Iterator[psycopg.Connection]:
        """A pooled connection; Unavailable when Postgres is down or the pool is exhausted.

        After a failure, callers wait at most ``OUTAGE_WAIT_S`` for a connection (not the
        pool's usual 30 s) until one call succeeds again: while Postgres is known to be
        down, a request answers "unavailable" at once instead of queueing behind it.
        """
        timeout = OUTAGE_WAIT_S if self._down.is_set() else timeout_s
        try:
            with self.pool.connection(timeout=timeout) as conn:
                yield conn
        except psycopg.OperationalError as exc:
            self._down.set()
            raise Unavailable("the database is unavailable", detail=str(exc)) from exc
        self._down.clear()

    def ping(self) -> None:
        """Raise Unavailable unless Postgres answers a query within ``OUTAGE_WAIT_S``
        (health checks; a failure also makes every later call fail fast, see above)."""
        with self.connection(timeout_s=OUTAGE_WAIT_S) as conn:
            conn.execute("SELECT 1")

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        """A connection inside one transaction: committed on exit, rolled back on error."""
        with self.connection() as conn, conn.transaction():
            yield conn


def lock_key(*parts: str) -> int:
    """A signed 64-bit advisory lock key for a name made of ``parts``."""
    digest = hashlib.sha256("\0".join(parts).encode()).digest()[:8]
    return int.from_bytes(digest, "big", signed=True)


def object_lock_key(digest: str) -> int:
    """The lock held while the object stored under this sha256 (a field image, a crop,
    a mask) is written, used by rows being committed, or judged an orphan and deleted."""
    return int.from_bytes(bytes.fromhex(digest[:16]), "big", signed=True)


@contextmanager
def advisory_locks(conn: psycopg.Connection, keys: Iterable[int]) -> Iterator[None]:
    """Session-level advisory locks on ``conn``, committed so no transaction stays open.

    Taken in ascending order, so two holders of overlapping sets wait for each other
    instead of deadlocking; released in any case on exit.
    """
    ordered = sorted(set(keys))
    taken: list[int] = []
    try:
        for key in ordered:
            conn.execute("SELECT pg_advisory_lock(%s)", (key,))
            taken.append(key)
        conn.commit()
        yield
    finally:
        if not conn.closed and not conn.broken:
            conn.rollback()
            for key in reversed(taken):
                conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
            conn.commit()
