"""Postgres access: one connection pool per process and the migration runner.

Migrations are the ordered ``bmcell/migrations/NNNN_name.sql`` files. Each is applied
once, in its own transaction, and recorded in ``schema_migrations`` with its checksum.
A session-level advisory lock serialises runners, so several services starting at the
same moment apply the schema exactly once; a changed file that was already applied is
refused rather than silently skipped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
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
        )

    def open(self, timeout_s: float = 30.0) -> Database:
        try:
            self.pool.open(wait=True, timeout=timeout_s)
        except psycopg.OperationalError as exc:  # pool timeout subclasses this
            raise Unavailable(f"Postgres at BMCELL_DATABASE_URL is not reachable: {exc}") from exc
        return self

    def close(self) -> None:
        self.pool.close()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        try:
            with self.pool.connection() as conn:
                yield conn
        except psycopg.OperationalError as exc:
            raise Unavailable(f"Postgres is unavailable: {exc}") from exc

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        """A connection inside one transaction: committed on exit, rolled back on error."""
        with self.connection() as conn, conn.transaction():
            yield conn
