"""Process start-up shared by every service: settings, logs, schema, storage, pool.

A bad setting ends the process before it serves, with exit status 2 and one line
naming the variable, which is what an operator reading a crash loop needs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Generic, TypeVar

import structlog

from bmcell import audit, log, tls
from bmcell import db as dbmod
from bmcell.errors import BmcellError, ConfigError
from bmcell.settings import Settings, load
from bmcell.storage import ObjectStore

S = TypeVar("S", bound=Settings)


@dataclass
class Runtime(Generic[S]):
    settings: S
    db: dbmod.Database
    store: ObjectStore
    log: structlog.BoundLogger


def settings_or_exit(name: str, cls: type[S]) -> S:
    try:
        return load(cls)
    except ConfigError as exc:
        print(f"{name}: bad configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def boot(name: str, cls: type[S]) -> Runtime[S]:
    settings = settings_or_exit(name, cls)
    logger = log.configure(name, settings.log_level, settings.log_format)
    audit.set_process_identity(name)
    tls.warn_if_off(settings, name)
    try:
        dbmod.migrate(settings.database_url)
        store = ObjectStore(settings).ensure_buckets()
        database = dbmod.Database(settings, name=name).open()
    except BmcellError as exc:
        logger.error("start-up failed", error=str(exc))
        print(f"{name}: cannot start: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    except Exception as exc:  # psycopg errors on a bad conninfo, before any pool exists
        logger.error("start-up failed", error=str(exc))
        print(f"{name}: cannot start: BMCELL_DATABASE_URL: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    return Runtime(settings, database, store, logger)
