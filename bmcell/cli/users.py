"""``bmcell users add | set | disable | enable | token | revoke | list | service``:
people, service accounts and their API tokens. Every change is audited
(``bmcell audit --entity user:NAME``).

Talks to Postgres directly (BMCELL_DATABASE_URL; the embedded stack's env file
supplies it after ``bmcell stack up``). A token is printed once, on stdout alone, so
``TOKEN=$(bmcell users token ana)`` captures it; only its sha256 is stored.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

import click
import psycopg

from bmcell import users as repo
from bmcell.auth import PREFIX_LEN, ROLES, new_token
from bmcell.cli.common import in_database

T = TypeVar("T")


def _run(fn: Callable[[psycopg.Connection], T]) -> T:
    return in_database(fn, name="bmcell-users")


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
    _run(lambda conn: repo.add_user(conn, name, role, list(labs)))
    click.echo(
        f"user {name!r} added as {role}" + (f" for {', '.join(labs)}" if labs else ""), err=True
    )


@users.command("set")
@click.argument("name")
@click.option("--role", type=click.Choice(ROLES), help="The person's new role.")
@click.option("--lab", "labs", multiple=True, help="Lab code (repeat); replaces the old list.")
def set_(name: str, role: str | None, labs: tuple[str, ...]) -> None:
    """Change a user's role or labs."""
    after = _run(lambda conn: repo.change_user(conn, name, role=role, lab_codes=list(labs) or None))
    click.echo(
        f"user {name!r} is {after['role']} for {', '.join(after['labs']) or 'every lab'}", err=True
    )


@users.command()
@click.argument("name")
def disable(name: str) -> None:
    """Disable a user: every token of theirs stops working at once."""
    changed = _run(lambda conn: repo.set_disabled(conn, name, True))
    click.echo(f"user {name!r} {'disabled' if changed else 'was already disabled'}", err=True)


@users.command()
@click.argument("name")
def enable(name: str) -> None:
    """Enable a disabled user again (their unexpired, unrevoked tokens work again)."""
    changed = _run(lambda conn: repo.set_disabled(conn, name, False))
    click.echo(f"user {name!r} {'enabled' if changed else 'was not disabled'}", err=True)


@users.command()
@click.argument("name")
@click.option("--expires-days", type=float, help="Days until the token stops working.")
def token(name: str, expires_days: float | None) -> None:
    """Issue an API token and print it once (it cannot be shown again)."""
    issued = _run(lambda conn: repo.issue_token(conn, name, expires_days))
    click.echo(issued.token)
    until = issued.expires_at.isoformat() if issued.expires_at else "never"
    click.echo(f"token {issued.prefix}... for {name!r}; expires: {until}", err=True)


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
def list_() -> None:
    """Every user with role, labs and live token count."""
    for row in _run(repo.list_users):
        state = " (disabled)" if row["disabled_at"] else ""
        labs = ",".join(row["labs"]) or "*"
        click.echo(f"{row['name']}\t{row['role']}\t{labs}\t{row['live_tokens']} token(s){state}")
