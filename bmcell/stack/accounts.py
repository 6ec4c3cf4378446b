"""The embedded stack's service accounts and its developer's operator token.

Each gRPC service gets a user of role ``service`` and a token, handed to it as
``BMCELL_SERVICE_TOKEN``; it sends that token on its calls to the other services.
The developer's CLI gets an operator token (``BMCELL_TOKEN`` in ``stack.env``), so
commands work after ``bmcell stack up`` as before, and an admin's beside it
(``BMCELL_ADMIN_TOKEN``) for the people-management calls only an admin may make
(``BMCELL_TOKEN=$BMCELL_ADMIN_TOKEN bmcell users add ...``). The secrets are generated once
per run folder and kept in ``secrets/tokens.json`` (mode 0600, beside the database
they unlock, which trusts local connections anyway); Postgres stores only their
hashes. To rotate: delete the file, then ``bmcell stack down && bmcell stack up``.
"""

from __future__ import annotations

import json
import os

import psycopg
from psycopg.rows import dict_row

from bmcell import db as dbmod
from bmcell import users
from bmcell.auth import new_token
from bmcell.stack.config import StackConfig

OPERATOR = "stack-operator"
ADMIN = "stack-admin"
# The developer's own accounts (not services'), by name: their role.
PEOPLE = {OPERATOR: "operator", ADMIN: "admin"}


def account_name(service: str) -> str:
    return f"svc-{service}"


def tokens(cfg: StackConfig, services: list[str]) -> dict[str, str]:
    """Account name -> token for ``services``, the operator and the admin, created when
    missing."""
    path = cfg.run_dir / "secrets" / "tokens.json"
    try:
        known = json.loads(path.read_text())
    except FileNotFoundError:
        known = {}
    wanted = [*PEOPLE, *(account_name(s) for s in services)]
    missing = [name for name in wanted if name not in known]
    if missing:
        known.update({name: new_token()[0] for name in missing})
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(known, f, indent=2)
        tmp.replace(path)
    return {name: known[name] for name in wanted}


def provision(database_url: str, accounts: dict[str, str]) -> None:
    """Make every account and its token work (idempotent); the schema first, since
    this runs before the first service has migrated a fresh database."""
    dbmod.migrate(database_url)
    with psycopg.connect(database_url, row_factory=dict_row) as conn, conn.transaction():
        for name, token in accounts.items():
            users.ensure_account(conn, name, PEOPLE.get(name, "service"), token)
