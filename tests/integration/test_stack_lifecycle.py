"""`stack up` is idempotent, `stack down` leaves no process and no port behind, and
what was stored survives them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bmcell.settings import Settings
from bmcell.stack import Stack, StackConfig
from bmcell.stack.components import port_open
from bmcell.stack.config import PORT_OFFSETS, REPO
from bmcell.stack.manager import _alive
from bmcell.storage import ObjectStore
from tests.conftest import stack_port_base

pytestmark = pytest.mark.integration


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bmcell.cli.main", "stack", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_up_twice_then_down_leaves_nothing() -> None:
    base = stack_port_base() + 100
    run_dir = REPO / ".run" / f"test-{base}"
    env = {**os.environ, "BMCELL_STACK_PORT_BASE": str(base), "BMCELL_STACK_RUN_DIR": str(run_dir)}
    try:
        first = _cli("up", env=env)
        assert first.returncode == 0, first.stderr
        import json

        status = json.loads(_cli("status", "--json", env=env).stdout)
        assert all(c["healthy"] for c in status.values()), status
        pids = {name: c["pid"] for name, c in status.items()}
        store = _store(base, run_dir)
        key, _ = store.put_content_addressed("cells", KEPT, suffix=".png")

        ca = (run_dir / "tls" / "ca.crt").read_bytes()
        again = _cli("up", env=env)
        assert again.returncode == 0, again.stderr
        assert "already running" in again.stderr
        assert (run_dir / "tls" / "ca.crt").read_bytes() == ca  # clients keep trusting it
        status2 = json.loads(_cli("status", "--json", env=env).stdout)
        assert {name: c["pid"] for name, c in status2.items()} == pids
    finally:
        down = _cli("down", env=env)
    assert down.returncode == 0, down.stderr
    assert not [name for name, pid in pids.items() if _alive(pid)]
    held = [base + off for off in PORT_OFFSETS.values() if port_open("127.0.0.1", base + off)]
    assert not held, f"ports still held after down: {held}"
    out = subprocess.run(
        [
            "pgrep",
            "-f",
            f"bmcell-ray-{base + PORT_OFFSETS['ray']}|port={base + PORT_OFFSETS['ray']}",
        ],
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip() == "", f"Ray processes left: {out.stdout}"
    assert _cli("status", env=env).returncode == 1

    # The object store keeps its objects on disk: after `down`, a fresh start of it
    # serves the same bytes (the in-memory server used before lost them).
    stack = Stack(StackConfig(run_dir=run_dir, port_base=base))
    try:
        stack.up(only=["s3"])
        assert _store(base, run_dir).get(key) == KEPT
    finally:
        stack.down()


KEPT = b"a crop that must outlive the stack " * 64


def _store(base: int, run_dir) -> ObjectStore:
    env = Stack(StackConfig(run_dir=run_dir, port_base=base)).env()
    settings = Settings(
        database_url=env["BMCELL_DATABASE_URL"],
        s3_endpoint=env["BMCELL_S3_ENDPOINT"],
        s3_access_key=env["BMCELL_S3_ACCESS_KEY"],
        s3_secret_key=env["BMCELL_S3_SECRET_KEY"],
        s3_secure=env["BMCELL_S3_SECURE"],
        tls=env["BMCELL_TLS"],
        tls_ca=env.get("BMCELL_TLS_CA"),
    )
    return ObjectStore(settings).ensure_buckets()
