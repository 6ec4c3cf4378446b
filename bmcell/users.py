"""People and their API tokens: the repository behind ``bmcell users``.

Every function takes an open connection inside a transaction, so the CLI (which talks
to Postgres directly) and tests share one code path. Every change is audited in that
transaction (entity ``user``, id the user's name; never a token's secret or hash).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg

from bmcell import audit
from bmcell.auth import ALL_LAB_ROLES, PREFIX_LEN, ROLES, TOKEN_SCHEME, new_token, token_hash
from bmcell.errors import Conflict, InvalidArgument, NotFound


@dataclass(frozen=True)
class IssuedToken:
    token: str
    prefix: str
    expires_at: datetime | None


def add_user(conn: psycopg.Connection, name: str, role: str, lab_codes: list[str]) -> int:
    _check_role_labs(role, lab_codes)
    if not 1 <= len(name) <= 100 or not name.isprintable():
        raise InvalidArgument(
            f"user name {name!r} must have 1 to 100 printable characters", field="name"
        )
    lab_ids = _lab_ids(conn, lab_codes)
    row = conn.execute(
        "INSERT INTO users (name, role) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING RETURNING id",
        (name, role),
    ).fetchone()
    if row is None:
        raise Conflict(f"user {name!r} already exists", field="name")
    for lab_id in lab_ids:
        conn.execute("INSERT INTO user_labs (user_id, lab_id) VALUES (%s, %s)", (row["id"], lab_id))
    audit.record(
        conn, "user.add", "user", name, after={"id": row["id"], "role": role, "labs": lab_codes}
    )
    return row["id"]


def change_user(
    conn: psycopg.Connection, name: str, *, role: str | None, lab_codes: list[str] | None
) -> dict:
    """A new role, new labs, or both (labs replace the old list); returns the new values."""
    if role is None and lab_codes is None:
        raise InvalidArgument("give --role, --lab or both", field="role")
    user_id = _user_id(conn, name, lock=True)
    before = _role_and_labs(conn, user_id)
    after = {
        "role": role or before["role"],
        "labs": before["labs"] if lab_codes is None else sorted(set(lab_codes)),
    }
    if after["role"] in ALL_LAB_ROLES and lab_codes is None:
        after["labs"] = []  # becoming an operator or admin: every lab, so no list
    _check_role_labs(after["role"], after["labs"])
    lab_ids = _lab_ids(conn, after["labs"])
    if after == before:
        return after
    conn.execute("UPDATE users SET role = %s WHERE id = %s", (after["role"], user_id))
    conn.execute("DELETE FROM user_labs WHERE user_id = %s", (user_id,))
    for lab_id in lab_ids:
        conn.execute("INSERT INTO user_labs (user_id, lab_id) VALUES (%s, %s)", (user_id, lab_id))
    audit.record(conn, "user.change", "user", name, before=before, after=after)
    return after


def set_disabled(conn: psycopg.Connection, name: str, disabled: bool) -> bool:
    """Disable a user (their tokens stop working at once; rows and history stay) or
    enable them again; False when they already were."""
    user_id = _user_id(conn, name, lock=True)
    row = conn.execute(
        """UPDATE users SET disabled_at = CASE WHEN %(off)s THEN now() END
            WHERE id = %(id)s AND (disabled_at IS NULL) = %(off)s RETURNING id""",
        {"off": disabled, "id": user_id},
    ).fetchone()
    if row is None:
        return False
    audit.record(conn, "user.disable" if disabled else "user.enable", "user", name)
    return True


def _check_role_labs(role: str, lab_codes: list[str]) -> None:
    if role not in ROLES:
        raise InvalidArgument(f"unknown role {role!r}; expected one of {ROLES}", field="role")
    if role in ALL_LAB_ROLES and lab_codes:
        raise InvalidArgument(
            f"role {role!r} sees every lab; --lab applies to uploader and reviewer", field="lab"
        )
    if role not in ALL_LAB_ROLES and not lab_codes:
        raise InvalidArgument(f"role {role!r} needs at least one --lab", field="lab")


def _lab_ids(conn: psycopg.Connection, lab_codes: list[str]) -> list[int]:
    rows = conn.execute("SELECT id, code FROM labs WHERE code = ANY(%s)", (lab_codes,)).fetchall()
    lab_ids = {r["code"]: r["id"] for r in rows}
    missing = [c for c in lab_codes if c not in lab_ids]
    if missing:
        raise NotFound(f"lab {missing[0]!r} does not exist", field="lab")
    return sorted(set(lab_ids.values()))


def _role_and_labs(conn: psycopg.Connection, user_id: int) -> dict:
    return conn.execute(
        """SELECT u.role, ARRAY(SELECT l.code FROM user_labs ul JOIN labs l ON l.id = ul.lab_id
                                 WHERE ul.user_id = u.id ORDER BY l.code) AS labs
             FROM users u WHERE u.id = %s""",
        (user_id,),
    ).fetchone()


def _user_id(conn: psycopg.Connection, name: str, *, lock: bool = False) -> int:
    row = conn.execute(
        "SELECT id FROM users WHERE name = %s" + (" FOR UPDATE" if lock else ""), (name,)
    ).fetchone()
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
    expires = row["expires_at"].isoformat() if row["expires_at"] else None
    audit.record(conn, "token.issue", "user", name, {"prefix": prefix, "expires_at": expires})
    return IssuedToken(token, prefix, row["expires_at"])


def ensure_account(conn: psycopg.Connection, name: str, role: str, token: str) -> None:
    """A user of ``role`` (labs: all) whose ``token`` works: what ``bmcell stack up``
    does for each service account and its developer's operator, again on every start.
    A token an admin revoked stays revoked: a new one comes from a new secret."""
    if role not in ALL_LAB_ROLES:
        raise InvalidArgument(f"role {role!r} needs labs; accounts are for {ALL_LAB_ROLES}")
    created = conn.execute(
        "INSERT INTO users (name, role) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING RETURNING id",
        (name, role),
    ).fetchone()
    user = conn.execute("SELECT id, role FROM users WHERE name = %s", (name,)).fetchone()
    if user["role"] != role:
        raise Conflict(f"user {name!r} exists with role {user['role']!r}, not {role!r}")
    if created is not None:
        audit.record(conn, "user.add", "user", name, after={"id": created["id"], "role": role})
    registered = conn.execute(
        """INSERT INTO api_tokens (user_id, token_hash, prefix) VALUES (%s, %s, %s)
           ON CONFLICT (token_hash) DO NOTHING RETURNING prefix""",
        (user["id"], token_hash(token), token[:PREFIX_LEN]),
    ).fetchone()
    if registered is not None:
        audit.record(conn, "token.issue", "user", name, {"prefix": registered["prefix"]})


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
        rows = conn.execute(
            """UPDATE api_tokens t SET revoked_at = now() FROM users u
                WHERE u.id = t.user_id AND t.prefix = %s AND t.revoked_at IS NULL
            RETURNING u.name, t.prefix""",
            (token_prefix[:PREFIX_LEN],),
        ).fetchall()
    else:
        user_id = _user_id(conn, name or "")
        rows = conn.execute(
            """UPDATE api_tokens t SET revoked_at = now() FROM users u
                WHERE u.id = t.user_id AND t.user_id = %s AND t.revoked_at IS NULL
            RETURNING u.name, t.prefix""",
            (user_id,),
        ).fetchall()
    for owner in sorted({r["name"] for r in rows}):
        prefixes = sorted(r["prefix"] for r in rows if r["name"] == owner)
        audit.record(conn, "token.revoke", "user", owner, {"prefixes": prefixes})
    return len(rows)


_USERS = """SELECT u.name, u.role, u.disabled_at,
                  ARRAY(SELECT l.code FROM user_labs ul JOIN labs l ON l.id = ul.lab_id
                         WHERE ul.user_id = u.id ORDER BY l.code) AS labs,
                  (SELECT count(*) FROM api_tokens t
                    WHERE t.user_id = u.id AND t.revoked_at IS NULL
                      AND (t.expires_at IS NULL OR t.expires_at > now())) AS live_tokens
             FROM users u"""


def list_users(conn: psycopg.Connection) -> list[dict]:
    return conn.execute(_USERS + " ORDER BY u.name").fetchall()


def get_user(conn: psycopg.Connection, name: str) -> dict:
    row = conn.execute(_USERS + " WHERE u.name = %s", (name,)).fetchone()
    if row is None:
        raise NotFound(f"user {name!r} does not exist", field="name")
    return row
