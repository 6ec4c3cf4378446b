"""What commands share: a service's address, the caller's API token (``BMCELL_TOKEN``
or ``bmcell --token``; ``bmcell stack up`` writes an operator's into
``.run/stack.env``), error reporting, the labeling API's HTTP client
(``BMCELL_LABELAPI_URL``; ``labs``, ``specimens``, ``users``), and a Postgres
transaction for the commands that talk to the database directly (``audit``,
``users revoke | service``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import click
import grpc
import httpx
import psycopg

from bmcell import db as dbmod
from bmcell import grpc_client, http_client
from bmcell.errors import BmcellError
from bmcell.settings import Settings, load

T = TypeVar("T")


def address(variable: str) -> str:
    value = os.environ.get(variable)
    if not value:
        raise click.UsageError(f"{variable} is not set: run `bmcell stack up` or export it")
    return value


TOKEN_VAR = "BMCELL_TOKEN"


def api_token(token: str | None = None) -> str:
    """``token``, else BMCELL_TOKEN; a usage error (exit 2) when there is neither."""
    token = token or os.environ.get(TOKEN_VAR)
    if not token:
        raise click.UsageError(
            f"no API token: pass --token or set {TOKEN_VAR} "
            "(an admin issues one with `bmcell users token NAME`)"
        )
    return token


def channel(variable: str, timeout_s: float = 60.0) -> grpc.Channel:
    """A channel to the service at ``variable`` whose calls carry the caller's token."""
    return grpc_client.channel(address(variable), default_timeout_s=timeout_s, token=api_token())


@contextmanager
def rpc_errors() -> Iterator[None]:
    """A failed call prints one line with its status and exits 1, not a traceback."""
    try:
        yield
    except grpc.RpcError as exc:
        click.echo(f"error: {exc.code().name}: {exc.details()}", err=True)
        sys.exit(1)


LABELAPI_VAR = "BMCELL_LABELAPI_URL"


@contextmanager
def labelapi(token: str | None = None) -> Iterator[httpx.Client]:
    """A client of the labeling API whose requests carry the caller's token; an https://
    API is verified against BMCELL_TLS_CA (the stack's CA), never the system's CAs."""
    with http_client.client(address(LABELAPI_VAR), api_token(token)) as client:
        yield client


def api_call(client: httpx.Client, method: str, path: str, **kw) -> dict:
    """The JSON answer of one call; a refusal or failure prints one line (status, the
    server's message and the field it names) and exits 1."""
    try:
        resp = client.request(method, path, **kw)
    except httpx.HTTPError as exc:
        click.echo(f"error: {method} {client.base_url}{path}: {exc}", err=True)
        sys.exit(1)
    if resp.status_code >= 400:
        try:
            body = resp.json()
            message = body.get("error") or resp.text
            field = body.get("field")
        except ValueError:
            message, field = resp.text.strip() or resp.reason_phrase, None
        where = f" ({field})" if field else ""
        click.echo(f"error: {resp.status_code}{where}: {message}", err=True)
        sys.exit(1)
    return resp.json()


@contextmanager
def _transaction(name: str) -> Iterator[psycopg.Connection]:
    settings = load(Settings)
    dbmod.migrate(settings.database_url)
    database = dbmod.Database(settings, name=name).open()
    try:
        with database.transaction() as conn:
            yield conn
    finally:
        database.close()


def in_database(fn: Callable[[psycopg.Connection], T], name: str = "bmcell-cli") -> T:
    """Run ``fn`` in one transaction on BMCELL_DATABASE_URL (schema brought up to date
    first); a refused call prints one line and exits 1."""
    try:
        with _transaction(name) as conn:
            return fn(conn)
    except BmcellError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
