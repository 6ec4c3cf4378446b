"""Test fixtures.

Integration tests share one embedded stack per session: real Postgres, the S3 server,
Triton, Ray and every service, on a port range of their own (26400+ by default,
``BMCELL_TEST_PORT_BASE`` to move it) so a developer's stack on 25400 keeps running.
Like a developer after ``bmcell stack up``, the session's CLI calls carry the stack's
operator token (``BMCELL_TOKEN``); calls made in the test process use
:func:`operator_channel` or their own tokens.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable, Iterator

import grpc
import pytest

from bmcell import grpc_client, scenario
from bmcell.db import Database
from bmcell.settings import Settings, load
from bmcell.stack import Stack, StackConfig
from bmcell.stack.config import REPO
from bmcell.storage import ObjectStore


def stack_port_base() -> int:
    return int(os.environ.get("BMCELL_TEST_PORT_BASE", "26400"))


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    base = stack_port_base()
    cfg = StackConfig(run_dir=REPO / ".run" / f"test-{base}", port_base=base)
    s = Stack(cfg, progress=lambda msg: print(f"[stack] {msg}", flush=True))
    s.down()
    shutil.rmtree(cfg.run_dir, ignore_errors=True)  # every session starts from empty state
    saved = dict(os.environ)
    try:
        s.up()
        os.environ.update(s.env())
        os.environ["BMCELL_TOKEN"] = s.operator_token()
        yield s
    finally:
        os.environ.clear()
        os.environ.update(saved)
        s.down()


@pytest.fixture(scope="session")
def stack_env(stack: Stack) -> dict[str, str]:
    return stack.env()


@pytest.fixture(scope="session")
def rt(stack: Stack) -> Iterator[tuple[Settings, Database, ObjectStore]]:
    """Settings, a Postgres pool and object storage of the session's stack."""
    settings = load(Settings)
    db = Database(settings).open()
    yield settings, db, ObjectStore(settings).ensure_buckets()
    db.close()


@pytest.fixture(scope="session")
def admin_token(stack: Stack) -> str:
    """The embedded stack's admin: makes labs, people and tokens."""
    return stack.admin_token()


@pytest.fixture(scope="session")
def operator_token(stack: Stack, admin_token: str) -> str:
    """An operator's API token: uploads to any lab, lists every lab's cells (made
    through the labeling API, as an admin would)."""
    return scenario.person_token(stack.env()["BMCELL_LABELAPI_URL"], admin_token, "test-operator")


@pytest.fixture(scope="session")
def operator_channel(operator_token: str) -> Callable[[str], grpc.Channel]:
    """Opens a channel to a service address whose calls carry the operator's token
    (and a generous default deadline, for tests' long calls)."""

    def open_channel(address: str) -> grpc.Channel:
        return grpc_client.channel(address, default_timeout_s=900, token=operator_token)

    return open_channel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
