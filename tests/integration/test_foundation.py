"""The embedded stack and the plumbing every service shares, against real components."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import grpc
import httpx
import psycopg
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from bmcell import db as dbmod
from bmcell import tls
from bmcell.errors import NotFound
from bmcell.grpc_client import bearer
from bmcell.settings import Settings, load
from bmcell.stack import Stack
from bmcell.stack.components import GRPC_SERVICES, labelapi_url
from bmcell.storage import ObjectStore
from tests.conftest import free_port

pytestmark = pytest.mark.integration


def test_every_component_is_healthy(stack: Stack) -> None:
    statuses = {s.name: s for s in stack.status()}
    assert set(statuses) >= {"postgres", "s3", "triton", "ray", *GRPC_SERVICES, "labelapi"}
    assert all(s.healthy for s in statuses.values()), statuses


def test_status_json_from_the_cli(stack: Stack) -> None:
    env = {
        **os.environ,
        "BMCELL_STACK_RUN_DIR": str(stack.config.run_dir),
        "BMCELL_STACK_PORT_BASE": str(stack.config.port_base),
    }
    out = subprocess.run(
        [sys.executable, "-m", "bmcell.cli.main", "stack", "status", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    import json

    report = json.loads(out.stdout)
    assert all(c["healthy"] for c in report.values()), report


@pytest.mark.parametrize("name", sorted(GRPC_SERVICES))
def test_grpc_health_serving(stack: Stack, name: str) -> None:
    with tls.grpc_channel(stack.config.addr(name)) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", GRPC_SERVICES[name]):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def _reflect(channel: grpc.Channel, symbol: str) -> descriptor_pool.DescriptorPool:
    """Build a descriptor pool from what the server says about ``symbol``."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    pool = descriptor_pool.DescriptorPool()
    pending = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)]
    seen: set[str] = set()
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    while pending:
        for resp in stub.ServerReflectionInfo(iter([pending.pop()]), timeout=5):
            for raw in resp.file_descriptor_response.file_descriptor_proto:
                fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
                if fd.name in seen:
                    continue
                seen.add(fd.name)
                files[fd.name] = fd
                pending += [
                    reflection_pb2.ServerReflectionRequest(file_by_filename=dep)
                    for dep in fd.dependency
                    if dep not in seen
                ]

    def add(name: str) -> None:
        fd = files[name]
        for dep in fd.dependency:
            if dep in files:
                try:
                    pool.FindFileByName(dep)
                except KeyError:
                    add(dep)
        try:
            pool.FindFileByName(name)
        except KeyError:
            pool.Add(fd)

    for name in files:
        add(name)
    return pool


# One read-only call per service, with the answer expected on an empty system; each
# carries an operator's token (every service asks for one; bmcell.policy).
REFLECTION_CALLS = {
    "segmenter": ("ListCells", {"specimen": "no-such-specimen"}, None),
    "classifier": ("ListModels", {}, None),
    "selector": ("GetSelection", {"round_id": 987654}, grpc.StatusCode.NOT_FOUND),
    "trainer": ("GetJob", {"job_id": "no-such-job"}, grpc.StatusCode.NOT_FOUND),
    "rounds": ("GetRound", {"round_id": 987654}, grpc.StatusCode.NOT_FOUND),
}


@pytest.mark.parametrize("name", sorted(GRPC_SERVICES))
def test_call_every_service_through_reflection(
    stack: Stack, operator_token: str, name: str
) -> None:
    full = GRPC_SERVICES[name]
    method_name, fields, expected_error = REFLECTION_CALLS[name]
    with tls.grpc_channel(stack.config.addr(name)) as ch:
        pool = _reflect(ch, full)
        service = pool.FindServiceByName(full)
        method = service.methods_by_name[method_name]
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        call = ch.unary_unary(
            f"/{full}/{method_name}",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        if expected_error is None:
            answer = call(request_cls(**fields), metadata=bearer(operator_token), timeout=10)
            assert isinstance(answer, response_cls)
        else:
            with pytest.raises(grpc.RpcError) as err:
                call(request_cls(**fields), metadata=bearer(operator_token), timeout=10)
            assert err.value.code() == expected_error
            assert str(next(iter(fields.values()))) in err.value.details()
        listed = {
            s.name
            for s in reflection_pb2_grpc.ServerReflectionStub(ch)
            .ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
            .__next__()
            .list_services_response.service
        }
        assert {full, "grpc.health.v1.Health"} <= listed


def test_metrics_endpoint_counts_calls(stack: Stack, operator_channel) -> None:
    with operator_channel(stack.config.addr("selector")) as ch:
        from bmcell.v1 import selector_pb2, selector_pb2_grpc

        with pytest.raises(grpc.RpcError):
            selector_pb2_grpc.SelectorStub(ch).GetSelection(
                selector_pb2.GetSelectionRequest(round_id=10**9), timeout=5
            )
    text = httpx.get(f"http://{stack.config.addr('selector_metrics')}/metrics", timeout=5).text
    assert (
        'bmcell_grpc_requests_total{code="NOT_FOUND",method="GetSelection",service="bmcell.v1.Selector"}'
        in text
    )


def test_labelapi_publishes_openapi(stack: Stack) -> None:
    resp = httpx.get(
        f"{labelapi_url(stack.config)}/openapi.json", timeout=5, verify=tls.httpx_verify()
    )
    assert resp.status_code == 200
    assert resp.json()["info"]["title"] == "bmcell labeling API"


def _fresh_database(stack_env: dict[str, str]) -> str:
    admin = stack_env["BMCELL_DATABASE_URL"].rsplit("/", 1)[0] + "/postgres"
    name = f"mig_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return stack_env["BMCELL_DATABASE_URL"].rsplit("/", 1)[0] + f"/{name}"


def test_two_processes_migrate_at_once(stack_env: dict[str, str]) -> None:
    url = _fresh_database(stack_env)
    code = (
        "import sys; from bmcell import log; log.configure('t'); from bmcell.db import migrate; "
        "print(','.join(migrate(sys.argv[1])))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    applied = [o[0].strip() for o in outs]
    versions = [m.version for m in dbmod.migrations()]
    # Exactly one of the two applied everything; the other found nothing to do.
    assert sorted(applied) == ["", ",".join(versions)]
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
        assert [r[0] for r in rows] == versions
        assert (
            conn.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_name = 'cells'"
            ).fetchone()[0]
            == 1
        )
    assert dbmod.migrate(url) == []


def test_schema_refuses_bad_states(stack_env: dict[str, str]) -> None:
    url = _fresh_database(stack_env)
    dbmod.migrate(url)
    with psycopg.connect(url) as conn:
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("INSERT INTO labs (code) VALUES ('has space')")
        conn.rollback()
        lab = conn.execute("INSERT INTO labs (code) VALUES ('lab-a') RETURNING id").fetchone()[0]
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO labs (code) VALUES ('lab-a')")
        conn.rollback()
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            conn.execute("INSERT INTO specimens (lab_id, code) VALUES (%s, 's1')", (lab + 999,))


def test_object_store_content_addressed(stack_env: dict[str, str]) -> None:
    store = ObjectStore(load(Settings)).ensure_buckets()
    data = uuid.uuid4().bytes * 100
    key, digest = store.put_content_addressed("test", data, suffix=".bin")
    assert key == f"test/{digest[:2]}/{digest}.bin"
    assert store.put_content_addressed("test", data, suffix=".bin") == (key, digest)
    assert store.get(key) == data
    presigned = store.presigned_url(key, expires_s=60)
    assert presigned.startswith("https://")
    assert httpx.get(presigned, timeout=5, verify=tls.httpx_verify()).content == data
    store.delete(key)
    with pytest.raises(NotFound, match=key):
        store.get(key)


def _start_service(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.selector"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_missing_address_fails_at_start(stack_env: dict[str, str]) -> None:
    env = {k: v for k, v in {**os.environ, **stack_env}.items() if k != "BMCELL_CLASSIFIER_ADDR"}
    out = _start_service(env)
    assert out.returncode == 2
    assert "BMCELL_CLASSIFIER_ADDR is required" in out.stderr


def test_port_in_use_fails_at_start(stack: Stack, stack_env: dict[str, str]) -> None:
    env = {
        **os.environ,
        **stack_env,
        "BMCELL_GRPC_PORT": str(stack.config.port("selector")),
        "BMCELL_METRICS_PORT": str(free_port()),
    }
    out = _start_service(env)
    assert out.returncode == 2
    assert f"BMCELL_GRPC_PORT={stack.config.port('selector')}" in out.stderr
