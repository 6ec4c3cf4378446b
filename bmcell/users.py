"""People and their API tokens: the repository behind ``bmcell users``.

Every function takes an open connection inside a transaction, so the CLI (which talks
to Postgres directly) and tests share one code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg

from bmcell.auth import ALL_LAB_ROLES, PREFIX_LEN, ROLES, TOKEN_SCHEME, new_token, token_hash
from bmcell.errors import Conflict, InvalidArgument, NotFound


@dataclass(frozen=True)
class IssuedToken:
    token: str
    prefix: str
    expires_at: datetime | None


def add_user(conn: psycopg.Connection, name: str, role: str, lab_codes: list[str]) -> int:
    if role not in ROLES:
        raise InvalidArgument(f"unknown role {role!r}; expected one of {ROLES}", field="role")
    if role in ALL_LAB_ROLES and lab_codes:
        raise InvalidArgument(
            f"role {role!r} sees every lab; --lab applies to uploader and reviewer", field="lab"
        )
    if role not in ALL_LAB_ROLES and not lab_codes:
        raise InvalidArgument(f"role {role!r} needs at least one --lab", field="lab")
    if not 1 <= len(name) <= 100:
        raise InvalidArgument(f"user name {name!r} must have 1 to 100 characters", field="name")
    rows = conn.execute("SELECT id, code FROM labs WHERE code = ANY(%s)", (lab_codes,)).fetchall()
    lab_ids = {r["code"]: r["id"] for r in rows}
    missing = [c for c in lab_codes if c not in lab_ids]
    if missing:
        raise NotFound(f"lab {missing[0]!r} does not exist", field="lab")
    row = conn.execute(
        "INSERT INTO users (name, role) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING RETURNING id",
        (name, role),
    ).fetchone()
    if row is None:
        raise Conflict(f"user {name!r} already exists", field="name")
    for lab_id in lab_ids.values():
        conn.execute("INSERT INTO user_labs (user_id, lab_id) VALUES (%s, %s)", (row["id"], lab_id))
    return row["id"]


def _user_id(conn: psycopg.Connection, name: str) -> int:
    row = conn.execute("SELECT id FROM users WHERE name = %s", (name,)).fetchone()
    if row is None:
        raise NotFound(f"user {name!r} does not exist", field="name")
    return row["id"]


def issue_token(conn: psycopg.Connection, name: str, expires_days: float | None) -> IssuedToken:
    if expires_days is not None and expires_days <= 0:
        raise InvalidArgument(f"must be positive, got {expires_days}", field="expires_days")
    user_id = _user_id(conn, name)
    token, prefix, digest = new_token()
    row = conn.execute(
        """INSERT INTO api_tokens (user_id, token_hash, prefix, expires_at)
           VALUES (%s, %s, %s, now() + make_interval(secs => %s))
           RETURNING expires_at""",
        (user_id, digest, prefix, None if expires_days is None else expires_days * 86400),
    ).fetchone()
    return IssuedToken(token, prefix, row["expires_at"])


def ensure_account(conn: psycopg.Connection, name: str, role: str, token: str) -> None:
    """A user of ``role`` (labs: all) whose ``token`` works: what ``bmcell stack up``
    does for each service account and its developer's operator, again on every start.
    A token an admin revoked stays revoked: a new one comes from a new secret."""
    if role not in ALL_LAB_ROLES:
        raise InvalidArgument(f"role {role!r} needs labs; accounts are for {ALL_LAB_ROLES}")
    conn.execute(
        "INSERT INTO users (name, role) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
        (name, role),
    )
    user = conn.execute("SELECT id, role FROM users WHERE name = %s", (name,)).fetchone()
    if user["role"] != role:
        raise Conflict(f"user {name!r} exists with role {user['role']!r}, not {role!r}")
    conn.execute(
        """INSERT INTO api_tokens (user_id, token_hash, prefix) VALUES (%s, %s, %s)
           ON CONFLICT (token_hash) DO NOTHING""",
        (user["id"], token_hash(token), token[:PREFIX_LEN]),
    )


def revoke(conn: psycopg.Connection, *, name: str | None, token_prefix: str | None) -> int:
    """Revoke a user's live tokens, or the one with ``token_prefix``; returns how many."""
    if (name is None) == (token_prefix is None):
        raise InvalidArgument("give a user name or --token-prefix, not both", field="name")
    if token_prefix is not None:
        if not token_prefix.startswith(TOKEN_SCHEME) or len(token_prefix) < PREFIX_LEN:
            raise InvalidArgument(
                f"{token_prefix!r} is not a token prefix (like {TOKEN_SCHEME}AbCd1234)",
                field="token_prefix",
            )
        cur = conn.execute(
            """UPDATE api_tokens SET revoked_at = now()
                WHERE prefix = %s AND revoked_at IS NULL""",
            (token_prefix[:PREFIX_LEN],),
        )
    else:
        user_id = _user_id(conn, name or "")
        cur = conn.execute(
            "UPDATE api_tokens SET revoked_at = now() WHERE user_id = %s AND revoked_at IS NULL",
            (user_id,),
        )
    return cur.rowcount


def list_users(conn: psycopg.Connection) -> list[dict]:
    return conn.execute(
        """SELECT u.name, u.role, u.disabled_at,
                  ARRAY(SELECT l.code FROM user_labs ul JOIN labs l ON l.id = ul.lab_id
                         WHERE ul.user_id = u.id ORDER BY l.code) AS labs,
                  (SELECT count(*) FROM api_tokens t
                    WHERE t.user_id = u.id AND t.revoked_at IS NULL
                      AND (t.expires_at IS NULL OR t.expires_at > now())) AS live_tokens
             FROM users u ORDER BY u.name"""
    ).fetchall()
