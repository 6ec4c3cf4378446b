"""Storage faults against the embedded stack (issue 16), one module sharing one stack:

* the segmenter is SIGKILLed between writing a new field's objects and committing its
  rows (``BMCELL_FAULT_PAUSE_BEFORE_COMMIT_S`` holds it there): ``bmcell storage check``
  reports the orphans, ``--repair`` keeps them within the grace period and deletes
  them after it, and the same file then uploads as a new field;
* a crop and a mask are deleted by hand: the check reports exactly those, a re-upload
  of the same file restores them, and so does ``--repair``, byte for byte;
* two registrations of one model at the same moment: two versions, intact files;
* Postgres stopped for 60 s under light load: the labeling API answers 503, every
  gRPC service's health is NOT_SERVING and its calls UNAVAILABLE; all of it serves
  again by itself once Postgres is back, with the same processes.

The stack is shared with the session's other modules, so checks are judged by what
changed (findings before and after), never by the absolute count.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from bmcell import integrity, modelstore, tls
from bmcell.grpc_client import bearer
from bmcell.integrity import VERSION_FILES
from bmcell.stack import Stack
from bmcell.stack.components import GRPC_SERVICES, labelapi_url
from bmcell.stack.config import REPO
from bmcell.storage import content_key
from bmcell.synth import lab_style, render_field, specimen_mix
from bmcell.taxonomy import DEFAULT_TAXONOMY
from bmcell.v1 import segmenter_pb2, segmenter_pb2_grpc
from tests.integration.seed import MeanColour
from tests.integration.test_rounds_restart import _reap, pid_of, signal_service

pytestmark = pytest.mark.integration
LAB = "lab-faults"
OUTAGE_S = 60.0
CHUNK = 256 << 10


# --- helpers -------------------------------------------------------------------------


def field_png(seed: int, size: int = 352) -> bytes:
    _, mix = specimen_mix(5, 0, 0)
    sample = render_field(np.random.default_rng(seed), lab_style(5, "lab-c"), mix, size)
    buf = io.BytesIO()
    Image.fromarray(sample.image).save(buf, "PNG")
    return buf.getvalue()


def upload_requests(data: bytes, specimen: str) -> Iterator[segmenter_pb2.UploadRequest]:
    yield segmenter_pb2.UploadRequest(
        header=segmenter_pb2.UploadHeader(lab=LAB, specimen=specimen, filename="f.png")
    )
    for i in range(0, len(data), CHUNK):
        yield segmenter_pb2.UploadRequest(chunk=data[i : i + CHUNK])


def storage_check(*args: str) -> tuple[int, dict]:
    """``bmcell storage check --json ARGS`` as an operator runs it: (exit status, report)."""
    proc = subprocess.run(
        [sys.executable, "-m", "bmcell.cli.main", "storage", "check", "--json", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def keys(findings: list[dict], problem: str) -> set[str]:
    return {f["key"] for f in findings if f["problem"] == problem}


def missing(db, store) -> set[str]:
    return {f.key for f in integrity.check(db, store).missing}


def wait_for(what: str, probe: Callable[[], object], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s}s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def upload(stack: Stack, operator_token: str):
    with tls.grpc_channel(stack.config.addr("segmenter")) as ch:
        stub = segmenter_pb2_grpc.SegmenterStub(ch)

        def call(data: bytes, specimen: str | None = None) -> segmenter_pb2.UploadResponse:
            specimen = specimen or f"s-{uuid.uuid4().hex[:8]}"
            return stub.Upload(
                upload_requests(data, specimen), metadata=bearer(operator_token), timeout=180
            )

        call.stub = stub  # type: ignore[attr-defined]
        yield call


def cell_keys(db, field_id: int) -> list[dict]:
    with db.connection() as conn:
        return conn.execute(
            "SELECT id, crop_key, mask_key FROM cells WHERE field_id = %s ORDER BY index_in_field",
            (field_id,),
        ).fetchall()


# --- a crash between the objects and the rows ---------------------------------------------


def test_killed_upload_leaves_orphans_that_repair_deletes(stack: Stack, rt, upload) -> None:
    _, db, store = rt
    data = field_png(1601)
    digest = hashlib.sha256(data).hexdigest()
    field_key = content_key("fields", digest, ".png")
    signal_service(stack, "segmenter", signal.SIGKILL)
    stack.up(only=["segmenter"], extra_env={"BMCELL_FAULT_PAUSE_BEFORE_COMMIT_S": "300"})
    try:
        started = time.time()
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(upload, data)
            wait_for("the field image written", lambda: store.exists(field_key), 120)
            time.sleep(3)  # its crops and masks follow within milliseconds
            written = {
                o.key
                for prefix in ("fields/", "cells/")
                for o in store.list_objects(prefix)
                if o.modified.timestamp() >= started - 1
            }
            signal_service(stack, "segmenter", signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as failed:
                call.result(timeout=60)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stack.up(only=["segmenter"])
    assert field_key in written and len(written) >= 3, written  # a field, a crop, a mask
    with db.connection() as conn:
        assert not conn.execute(
            "SELECT 1 FROM field_images WHERE sha256 = %s", (digest,)
        ).fetchall()

    found = integrity.check(db, store)  # the default grace period, an hour, spares them
    kept = integrity.repair(db, store, found, recut=None)
    assert written <= {f.key for f in kept.too_young} and all(store.exists(k) for k in written)

    status, report = storage_check("--repair", "--grace-s", "0")
    assert written <= keys(report["check"]["findings"], "orphan")
    assert written <= keys(report["repair"]["deleted"], "orphan")
    assert not written & keys(report["after"]["findings"], "orphan")
    assert not any(store.exists(k) for k in written)

    again = upload(data)
    assert not again.duplicate and again.cells > 0 and store.exists(field_key)


# --- a lost crop and mask ------------------------------------------------------------------


def test_lost_crop_and_mask_are_reported_and_restored(rt, upload) -> None:
    _, db, store = rt
    data = field_png(1602)
    first = upload(data)
    cells = cell_keys(db, first.field_id)
    assert len(cells) >= 2
    lost = {cells[0]["crop_key"], cells[1]["mask_key"]}
    original = {k: store.get(k) for k in lost}
    already = missing(db, store)

    store.delete(cells[0]["crop_key"])
    assert missing(db, store) - already == {cells[0]["crop_key"]}

    store.delete(cells[1]["mask_key"])
    again = upload(data)  # the same file once more repairs its field
    assert again.duplicate and again.field_id == first.field_id
    assert {k: store.get(k) for k in lost} == original

    for key in lost:
        store.delete(key)
    status, report = storage_check("--repair")
    assert status == (1 if report["after"]["findings"] else 0)
    assert lost <= keys(report["check"]["findings"], "missing")
    assert lost <= {f["key"] for f in report["repair"]["restored"]}
    assert not lost & keys(report["after"]["findings"], "missing")
    assert {k: store.get(k) for k in lost} == original


# --- two registrations at once -------------------------------------------------------------


def test_concurrent_registrations_keep_both_versions_intact(rt) -> None:
    _, db, store = rt
    name = f"faults-{uuid.uuid4().hex[:8]}"
    models = [MeanColour(1).eval(), MeanColour(2).eval()]
    together = threading.Barrier(len(models))

    def register(model: torch.nn.Module) -> int:
        together.wait()
        return modelstore.register_version(
            db, store, model, DEFAULT_TAXONOMY, 32, model_name=name, note="concurrent"
        )

    with ThreadPoolExecutor(len(models)) as pool:
        versions = list(pool.map(register, models))
    assert sorted(versions) == [1, 2]
    digests = set()
    for version in versions:
        files = modelstore.version_files(store, name, version)
        assert set(files) == {f"{name}/config.pbtxt"} | {
            f"{name}/{version}/{f}" for f in VERSION_FILES
        }
        meta = json.loads(files[f"{name}/{version}/metadata.json"])
        model_pt = files[f"{name}/{version}/model.pt"]
        assert meta["version"] == version
        assert meta["model_pt_sha256"] == hashlib.sha256(model_pt).hexdigest()
        digests.add(meta["model_pt_sha256"])
    assert len(digests) == 2  # each version holds its own model, not the other's
    found = integrity.check(db, store)
    assert not [f for f in found.findings if f.key.startswith(f"{name}/")]


# --- Postgres away for a minute ------------------------------------------------------------


def health(stack: Stack, name: str) -> int:
    try:
        with tls.grpc_channel(stack.config.addr(name)) as ch:
            return (
                health_pb2_grpc.HealthStub(ch)
                .Check(health_pb2.HealthCheckRequest(), timeout=3)
                .status
            )
    except grpc.RpcError:
        return -1


class Load:
    """A reviewer's page and a lab client asking every ~0.3 s; what they were told, by
    when they asked (a call that was already waiting for a connection when Postgres
    went away may wait the pool's full timeout)."""

    def __init__(self, stack: Stack, token: str, stub) -> None:
        self.http = httpx.Client(
            base_url=labelapi_url(stack.config),
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
            verify=tls.httpx_verify(),
        )
        self.stub, self.token = stub, token
        self.answers: list[tuple[float, int, str]] = []  # (time, HTTP status, gRPC code)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.3):
            asked = time.monotonic()
            try:
                status = self.http.get("/v1/me").status_code
            except httpx.HTTPError:
                status = -1
            try:
                self.stub.ListCells(
                    segmenter_pb2.ListCellsRequest(lab=LAB, limit=5),
                    metadata=bearer(self.token),
                    timeout=40,
                )
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            self.answers.append((asked, status, code))

    def since(self, t: float) -> list[tuple[float, int, str]]:
        return [a for a in self.answers if a[0] >= t]


def test_postgres_outage_is_unavailable_then_recovers(stack: Stack, operator_token, upload):
    services = list(GRPC_SERVICES)
    pids = {name: pid_of(stack, name) for name in [*services, "labelapi"]}
    load = Load(stack, operator_token, upload.stub)
    load.thread.start()
    try:
        wait_for("load answered", lambda: load.answers and load.answers[-1][1:] == (200, "OK"), 60)
        postgres = pid_of(stack, "postgres")
        os.kill(postgres, signal.SIGINT)  # fast shutdown: every session is cut
        _reap(postgres, 60)
        down_at = time.monotonic()

        wait_for(
            "every service NOT_SERVING",
            lambda: all(
                health(stack, n) == health_pb2.HealthCheckResponse.NOT_SERVING for n in services
            ),
            30,
        )
        wait_for("labelapi 503", lambda: any(a[1] == 503 for a in load.since(down_at)), 45)
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
        during = load.since(down_at + 5)  # calls in flight at the cut may fail otherwise
        assert during and {a[1] for a in during} == {503}, during
        assert {a[2] for a in during} == {"UNAVAILABLE"}, during
        assert all(health(stack, n) == health_pb2.HealthCheckResponse.NOT_SERVING for n in services)

        stack.up(only=["postgres"])
        back_at = time.monotonic()
        wait_for(
            "every service SERVING again",
            lambda: all(
                health(stack, n) == health_pb2.HealthCheckResponse.SERVING for n in services
            ),
            60,
        )
        wait_for(
            "the API and the segmenter answer again",
            lambda: [a[1:] for a in load.since(back_at)[-5:]] == [(200, "OK")] * 5,
            60,
        )
        print(f"[faults] recovered {time.monotonic() - back_at:.1f}s after Postgres was back")
    finally:
        load.stop.set()
        load.thread.join(timeout=30)
        stack.up(only=["postgres"])
    assert {name: pid_of(stack, name) for name in pids} == pids  # nothing was restarted
