"""``bmcell users add | set | disable | enable | token | revoke | list | service``:
people, service accounts and their API tokens. Every change is audited
(``bmcell audit --entity user:NAME``).

``add``, ``set``, ``disable``, ``enable``, ``token`` and ``list`` go through the
labeling API (``BMCELL_LABELAPI_URL``) with an admin's token (``BMCELL_TOKEN``, or
``--token``), so an admin needs no database credentials. ``revoke`` and ``service``
talk to Postgres directly (BMCELL_DATABASE_URL): they are the server side's recovery
and deployment tools (a lost admin token is revoked and replaced from there). A token
is printed once, on stdout alone, so ``TOKEN=$(bmcell users token ana)`` captures it;
only its sha256 is stored.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import TypeVar

import click
import psycopg

from bmcell import users as repo
from bmcell.auth import PREFIX_LEN, ROLES, new_token
from bmcell.cli.common import api_call, in_database, labelapi

T = TypeVar("T")


def _run(fn: Callable[[psycopg.Connection], T]) -> T:
    return in_database(fn, name="bmcell-users")


def _call(method: str, path: str, **kw) -> dict:
    with labelapi() as client:
        return api_call(client, method, path, **kw)


@click.group()
def users() -> None:
    """Reviewers, uploaders, operators and admins, and their API tokens."""


@users.command()
@click.argument("name")
@click.option("--role", required=True, type=click.Choice(ROLES), help="What the person may do.")
@click.option(
    "--lab",
    "labs",
    multiple=True,
    help="Lab code the person works for (repeat; uploaders and reviewers only).",
)
def add(name: str, role: str, labs: tuple[str, ...]) -> None:
    """Create a user; operators and admins see every lab."""
    _call("POST", "/v1/users", json={"name": name, "role": role, "labs": list(labs)})
    click.echo(
        f"user {name!r} added as {role}" + (f" for {', '.join(labs)}" if labs else ""), err=True
    )


def _change(name: str, body: dict) -> dict:
    return _call("PATCH", f"/v1/users/{name}", json=body)


@users.command("set")
@click.argument("name")
@click.option("--role", type=click.Choice(ROLES), help="The person's new role.")
@click.option("--lab", "labs", multiple=True, help="Lab code (repeat); replaces the old list.")
def set_(name: str, role: str | None, labs: tuple[str, ...]) -> None:
    """Change a user's role or labs."""
    if role is None and not labs:
        raise click.UsageError("give --role, --lab or both")
    body = {"role": role} if role else {}
    after = _change(name, body | ({"labs": list(labs)} if labs else {}))
    click.echo(
        f"user {name!r} is {after['role']} for {', '.join(after['labs']) or 'every lab'}", err=True
    )


@users.command()
@click.argument("name")
def disable(name: str) -> None:
    """Disable a user: every token of theirs stops working at once."""
    _change(name, {"disabled": True})
    click.echo(f"user {name!r} disabled", err=True)


@users.command()
@click.argument("name")
def enable(name: str) -> None:
    """Enable a disabled user again (their unexpired, unrevoked tokens work again)."""
    _change(name, {"disabled": False})
    click.echo(f"user {name!r} enabled", err=True)


@users.command()
@click.argument("name")
@click.option("--expires-days", type=float, help="Days until the token stops working.")
def token(name: str, expires_days: float | None) -> None:
    """Issue an API token and print it once (it cannot be shown again)."""
    issued = _call("POST", f"/v1/users/{name}/tokens", json={"expires_days": expires_days})
    click.echo(issued["token"])
    click.echo(
        f"token {issued['prefix']}... for {name!r}; expires: {issued['expires_at'] or 'never'}",
        err=True,
    )


@users.command()
@click.argument("name", required=False)
@click.option("--token-prefix", help="Revoke only the token starting with this prefix.")
def revoke(name: str | None, token_prefix: str | None) -> None:
    """Revoke every live token of NAME, or the one named by --token-prefix."""
    n = _run(lambda conn: repo.revoke(conn, name=name, token_prefix=token_prefix))
    if n == 0:
        click.echo("error: no live token matched", err=True)
        sys.exit(1)
    click.echo(f"revoked {n} token(s)", err=True)


@users.command()
@click.argument("name")
@click.option(
    "--token-stdin",
    is_flag=True,
    help="Register the token read from stdin (a deploy/ Secret) instead of issuing one.",
)
def service(name: str, token_stdin: bool) -> None:
    """Create service account NAME (role service) with a working token; run again, it
    only adds the token. deploy/ runs it with each service's BMCELL_SERVICE_TOKEN."""
    token = sys.stdin.read().strip() if token_stdin else new_token()[0]
    if not token:
        raise click.UsageError("--token-stdin: stdin held no token")
    _run(lambda conn: repo.ensure_account(conn, name, "service", token))
    if not token_stdin:
        click.echo(token)
    click.echo(f"service account {name!r}: token {token[:PREFIX_LEN]}... works", err=True)


@users.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_(as_json: bool) -> None:
    """Every user with role, labs and live token count."""
    found = _call("GET", "/v1/users")["users"]
    if as_json:
        click.echo(json.dumps(found, indent=1))
        return
    for row in found:
        state = " (disabled)" if row["disabled"] else ""
        labs = ",".join(row["labs"]) or "*"
        click.echo(f"{row['name']}\t{row['role']}\t{labs}\t{row['live_tokens']} token(s){state}")
