"""A new lab on an empty stack, with only the CLI, HTTP and tokens.

The whole loop a lab runs, played through the public interfaces: an admin makes the
lab and its people; an uploader uploads three specimens, one of them as a test
specimen; an operator starts the bootstrap and two CST+AL rounds; simulated
reviewers answer through the labeling API; the uploader reads the specimen's
differential count over HTTP. The clients are given a Postgres URL and an S3
endpoint that lead nowhere, so a client that tried either would fail here.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bmcell.stack import Stack, StackConfig
from bmcell.stack.config import REPO
from bmcell.synth import generate_dataset
from tests.conftest import stack_port_base

pytestmark = pytest.mark.integration

EXPERIMENT = "new-lab"
TERMINAL = ("published", "failed")
# Where a client that reached for storage itself would go: nowhere.
NOWHERE = {
    "BMCELL_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none?connect_timeout=1",
    "BMCELL_S3_ENDPOINT": "https://127.0.0.1:9",
    "BMCELL_S3_ACCESS_KEY": "none",
    "BMCELL_S3_SECRET_KEY": "none",
}


@pytest.fixture(scope="module")
def empty_stack() -> Iterator[Stack]:
    """A stack of its own, started empty (the session's stack holds other tests' data
    and models)."""
    base = stack_port_base() + 300
    cfg = StackConfig(run_dir=REPO / ".run" / f"test-{base}", port_base=base)
    s = Stack(cfg, progress=lambda msg: print(f"[new-lab stack] {msg}", flush=True))
    s.down()
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    try:
        s.up()
        yield s
    finally:
        s.down()


class Lab:
    """Runs `bmcell` as one person: the stack's addresses and CA, their own token."""

    def __init__(self, stack: Stack, tmp: Path) -> None:
        env = stack.env()
        self.base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("BMCELL_") or k == "BMCELL_TEST_PORT_BASE"
        }
        self.base.update({k: v for k, v in env.items() if k.endswith(("_ADDR", "_URL"))})
        self.base.update({k: v for k, v in env.items() if k.startswith("BMCELL_TLS")})
        self.base.update(NOWHERE)
        self.base["BMCELL_STACK_RUN_DIR"] = str(tmp / "no-stack")  # no env file to fall back on
        self.api = env["BMCELL_LABELAPI_URL"]

    def run(self, token: str, *args: str, timeout: float = 600) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "bmcell.cli.main", *args],
            env={**self.base, "BMCELL_TOKEN": token, "BMCELL_ADMIN_TOKEN": token, "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert out.returncode == 0, f"bmcell {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
        return out.stdout

    def round(self, token: str, round_id: int) -> dict:
        return json.loads(self.run(token, "round", "status", "--round-id", str(round_id), "--json"))


def _drive(lab: Lab, operator: str, admin: str, manifest: Path, scope: str, *start: str) -> dict:
    """Start a round as the operator; answer its tasks as simulated reviewers (made by
    the admin) until it ends."""
    r = json.loads(
        lab.run(operator, "round", "start", "--experiment", EXPERIMENT, *start, "--json")
    )
    deadline = time.monotonic() + 900
    while r.get("state") not in TERMINAL:
        assert time.monotonic() < deadline, r
        if r.get("state") == "reviewing":
            lab.run(admin, "review", "--simulate", "--truth", str(manifest), "--lab", scope)
        time.sleep(1.0)
        r = lab.round(operator, int(r["round_id"]))
    return r


def test_a_new_lab_runs_the_loop_through_public_calls(empty_stack: Stack, tmp_path: Path) -> None:
    lab = Lab(empty_stack, tmp_path)
    admin = empty_stack.admin_token()
    manifest = generate_dataset(
        tmp_path / "synth", labs=1, specimens=3, fields=6, seed=4242, size=704
    )
    code = manifest.specimens[0].lab
    training, other, test = (s for s in manifest.specimens)

    # --- the admin makes the lab and its people -----------------------------------------
    lab.run(admin, "labs", "add", code, "--name", "A new lab")
    lab.run(admin, "users", "add", "up-new", "--role", "uploader", "--lab", code)
    lab.run(admin, "users", "add", "op-new", "--role", "operator")
    uploader = lab.run(admin, "users", "token", "up-new").strip()
    operator = lab.run(admin, "users", "token", "op-new").strip()

    # --- the uploader uploads three specimens, the last as a test specimen --------------
    for spec, role in ((training, "training"), (other, "training"), (test, "test")):
        files = [str(manifest.root / f.image) for f in spec.fields]
        lab.run(
            uploader,
            "upload",
            "--lab",
            code,
            "--specimen",
            spec.id,
            "--diagnosis",
            spec.diagnosis,
            "--role",
            role,
            *files,
        )
    listed = json.loads(lab.run(uploader, "specimens", "list", "--lab", code, "--json"))
    roles = {s["code"]: s["role"] for s in listed}
    assert roles == {training.id: "training", other.id: "training", test.id: "test"}

    # --- the operator bootstraps; reviewers answer through the labeling API -------------
    truth = manifest.root / "manifest.json"
    boot = _drive(
        lab,
        operator,
        admin,
        truth,
        code,
        "--strategy=bootstrap",
        f"--scope={code}",
        "--seed=5",
        "--epochs=3",
        "--initial-per-class=2",
        "--validation-per-class=1",
        "--test-per-class=1",
        "--initial-reviews=1",
        "--test-reviews=1",
        "--max-waves=2",
        "--gate=0.01",  # a few dozen labels: the loop's mechanics, not the study's bar
    )
    assert boot["state"] == "published", boot
    assert boot.get("test_accuracy", 0) > 0, "a test split from the test specimen"

    # --- two CST+AL rounds publish --------------------------------------------------------
    for seed in (11, 12):
        r = _drive(
            lab,
            operator,
            admin,
            truth,
            code,
            "--strategy=cst+al",
            f"--scope={code}",
            f"--seed={seed}",
            "--sample=40",
            "--epochs=2",
        )
        assert r["state"] == "published", r

    # --- the uploader reads the differential count over HTTP ----------------------------
    with httpx.Client(
        base_url=lab.api,
        headers={"Authorization": f"Bearer {uploader}"},
        verify=ssl.create_default_context(cafile=lab.base["BMCELL_TLS_CA"]),
        timeout=600,
    ) as http:
        base = f"/v1/specimens/{code}/{training.id}"
        with http.stream("POST", f"{base}/predict") as resp:  # progress lines, then done
            assert resp.status_code == 200, resp.read()
            progress = [json.loads(line) for line in resp.iter_lines() if line.strip()]
        assert progress, "predicting on demand shows progress"
        resp = http.get(f"{base}/report", params={"format": "json"})
        assert resp.status_code == 200, resp.text
        report = resp.json()
    cells = report["cells"]
    assert cells["nucleated"] > 0 and cells["unclassified"] == 0, cells
    assert cells["reviewed"] + cells["predicted"] >= cells["nucleated"], cells
    assert abs(sum(report["percentages"].values()) - 100.0) < 1e-6, report["percentages"]
    assert any("500" in w for w in report["warnings"]), report["warnings"]  # a small count
