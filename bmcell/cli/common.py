"""What every command that talks to a service needs: its address and error reporting."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click
import grpc

from bmcell import grpc_client


def address(variable: str) -> str:
    value = os.environ.get(variable)
    if not value:
        raise click.UsageError(f"{variable} is not set: run `bmcell stack up` or export it")
    return value


def channel(variable: str, timeout_s: float = 60.0) -> grpc.Channel:
    return grpc_client.channel(address(variable), default_timeout_s=timeout_s)


@contextmanager
def rpc_errors() -> Iterator[None]:
    """A failed call prints one line with its status and exits 1, not a traceback."""
    try:
        yield
    except grpc.RpcError as exc:
        click.echo(f"error: {exc.code().name}: {exc.details()}", err=True)
        sys.exit(1)
