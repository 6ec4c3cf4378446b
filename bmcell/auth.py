"""Who is calling and what they may see: API tokens, roles and lab scope.

A token is ``bmc_`` plus 43 URL-safe characters of randomness. Only its sha256 is
stored (``api_tokens.token_hash``), with its first characters (``prefix``) so an
operator can name it when revoking. :func:`authenticate` is the one place a token
becomes a :class:`Principal`, for the labeling API (HTTP ``Authorization`` header)
and every gRPC service (``authorization`` metadata, read by :func:`bearer_token`)
alike.

Which roles may make which call is :mod:`bmcell.policy`'s table, enforced by the gRPC
interceptor (:mod:`bmcell.grpc_auth`) and the labeling API's dependency alike.

Scope: uploaders and reviewers see the labs listed for them in ``user_labs``;
operators, admins and service accounts see every lab. An object outside the caller's scope is reported
as missing (404), never as forbidden, so its existence does not leak. Writing is the
exception: :func:`require_upload` names the lab it refuses, since the caller chose it.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from bmcell.db import Database
from bmcell.errors import NotFound, PermissionDenied, Unauthenticated

TOKEN_SCHEME = "bmc_"
PREFIX_LEN = len(TOKEN_SCHEME) + 8
ROLES = ("uploader", "reviewer", "operator", "admin", "service")
# Roles that see every lab. ``service`` is a service account: the calls it may make
# (bmcell.policy) are few, but those reach every lab's cells (pool prediction, selection).
ALL_LAB_ROLES = frozenset({"operator", "admin", "service"})


def new_token() -> tuple[str, str, bytes]:
    """A fresh secret: (token, prefix, sha256 digest)."""
    token = TOKEN_SCHEME + secrets.token_urlsafe(32)
    return token, token[:PREFIX_LEN], token_hash(token)


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class Principal:
    user_id: int
    name: str
    role: str
    # None: every lab (operators and admins).
    lab_ids: frozenset[int] | None

    @property
    def all_labs(self) -> bool:
        return self.lab_ids is None

    def sees_lab(self, lab_id: int) -> bool:
        return self.lab_ids is None or lab_id in self.lab_ids

    def lab_list(self) -> list[int]:
        """Lab ids for ``= ANY(%s)`` filters; only meaningful when not ``all_labs``."""
        return sorted(self.lab_ids or ())

    def require(self, *roles: str, action: str = "do this") -> None:
        if self.role not in roles:
            raise PermissionDenied(
                f"role {self.role!r} may not {action}; it needs one of {', '.join(roles)}"
            )


# The principal of the call being served: set by the transport (gRPC interceptor,
# HTTP dependency) once the token is checked, read by domain code that records who
# acted (the audit trail) without threading the caller through every signature.
_caller: ContextVar[Principal | None] = ContextVar("bmcell_caller", default=None)


def current_principal() -> Principal | None:
    """The authenticated caller of the call in progress, or None outside one."""
    return _caller.get()


def caller() -> Principal:
    """The caller of the call in progress, for handlers behind the interceptor; outside
    one it is a programming error (a route or method that skipped authentication)."""
    principal = _caller.get()
    if principal is None:
        raise RuntimeError("no authenticated caller: this code runs only inside a checked call")
    return principal


@contextmanager
def acting_as(principal: Principal) -> Iterator[Principal]:
    """Run a block as ``principal``: what it records is attributed to them."""
    reset = _caller.set(principal)
    try:
        yield principal
    finally:
        _caller.reset(reset)


def bearer_token(value: str | None) -> str:
    """The token in an ``authorization`` value, for transports without FastAPI's parser
    (gRPC metadata)."""
    if not value:
        raise Unauthenticated(
            "missing 'authorization' metadata; send 'authorization: Bearer <token>' "
            "with a token from `bmcell users token NAME`"
        )
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("'authorization' metadata must be 'Bearer <token>'")
    return token.strip()


def authenticate(db: Database, token: str) -> Principal:
    """The principal a token stands for; Unauthenticated names why a token is refused."""
    with db.connection() as conn:
        row = conn.execute(
            """SELECT u.id, u.name, u.role, u.disabled_at,
                      t.revoked_at, t.expires_at, t.expires_at <= now() AS expired,
                      ARRAY(SELECT lab_id FROM user_labs ul WHERE ul.user_id = u.id) AS lab_ids
                 FROM api_tokens t JOIN users u ON u.id = t.user_id
                WHERE t.token_hash = %s""",
            (token_hash(token),),
        ).fetchone()
    if row is None:
        raise Unauthenticated("token is not known")
    if row["revoked_at"] is not None:
        raise Unauthenticated(f"token was revoked at {row['revoked_at'].isoformat()}")
    if row["expired"]:
        raise Unauthenticated(f"token expired at {row['expires_at'].isoformat()}")
    if row["disabled_at"] is not None:
        raise Unauthenticated(f"user {row['name']!r} is disabled")
    labs = None if row["role"] in ALL_LAB_ROLES else frozenset(row["lab_ids"])
    return Principal(row["id"], row["name"], row["role"], labs)


def lab_ids_for_codes(db: Database, principal: Principal, codes: Iterable[str]) -> list[int]:
    """Resolve lab codes the caller may see; an unknown or unseen code is NotFound."""
    wanted = list(codes)
    with db.connection() as conn:
        rows = conn.execute("SELECT id, code FROM labs WHERE code = ANY(%s)", (wanted,)).fetchall()
    found = {r["code"]: r["id"] for r in rows if principal.sees_lab(r["id"])}
    for code in wanted:
        if code not in found:
            raise NotFound(f"lab {code!r} does not exist", field="lab")
    return [found[c] for c in wanted]


def require_upload(db: Database, principal: Principal, lab_code: str) -> None:
    """Uploaders may upload to their own labs, operators and admins to any (a new lab
    is created by its first upload); which roles upload at all is bmcell.policy's.
    PermissionDenied names the lab."""
    if principal.all_labs:
        return
    with db.connection() as conn:
        rows = conn.execute(
            "SELECT id, code FROM labs WHERE code = %s OR id = ANY(%s) ORDER BY code",
            (lab_code, principal.lab_list()),
        ).fetchall()
    own = [r["code"] for r in rows if principal.sees_lab(r["id"])]
    if lab_code not in own:
        raise PermissionDenied(
            f"{principal.role} {principal.name!r} may not upload to lab {lab_code!r}; "
            f"their labs: {', '.join(own) or 'none'}",
            field="lab",
        )
