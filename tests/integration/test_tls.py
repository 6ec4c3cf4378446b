"""TLS on every hop of the embedded stack: a plaintext client is refused by every
service (gRPC services, Triton, the labeling API, the S3 store, Postgres), a client
trusting the stack's CA is served, a client trusting another CA refuses the server
(its certificate does not chain to that CA)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import httpx
import psycopg
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from minio import Minio
from minio.error import MinioException
from tritonclient.utils import InferenceServerException

from bmcell import tls, triton
from bmcell.errors import Unavailable
from bmcell.settings import Settings, TlsSettings, load
from bmcell.stack import Stack
from bmcell.stack.components import GRPC_SERVICES, labelapi_url, stack_tls
from bmcell.storage import ObjectStore
from tests.conftest import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> TlsSettings:
    """Client settings that trust a CA of their own, not the stack's."""
    files = tls.ensure_local_ca(tmp_path_factory.mktemp("other-ca"), ["127.0.0.1"])
    return TlsSettings(tls="on", tls_ca=files.ca, tls_cert=None, tls_key=None)


def health(channel: grpc.Channel, service: str = "") -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


def test_the_stack_made_its_ca_with_a_private_key(stack: Stack) -> None:
    assert stack.env()["BMCELL_TLS"] == "on"
    key = stack.config.tls_dir / "ca.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(stack.config.tls_dir.stat().st_mode) == 0o700
    # Processes get paths, never the CA's key.
    assert str(key) not in stack.env().values()
    assert Path(stack.env()["BMCELL_TLS_CA"]).read_bytes().startswith(b"-----BEGIN CERTIFICATE")


@pytest.mark.parametrize("name", sorted(GRPC_SERVICES))
def test_grpc_service_serves_tls_only(stack: Stack, other_ca: TlsSettings, name: str) -> None:
    addr = stack.config.addr(name)
    with tls.grpc_channel(addr, tls=stack_tls(stack.config)) as ch:
        assert health(ch, GRPC_SERVICES[name]) == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(addr) as ch, pytest.raises(grpc.RpcError) as plain:
        health(ch)
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
    with tls.grpc_channel(addr, tls=other_ca) as ch, pytest.raises(grpc.RpcError) as untrusted:
        health(ch)
    assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE


def test_probe_speaks_tls(stack: Stack, other_ca: TlsSettings) -> None:
    """deploy/'s probes: ``python -m bmcell.healthcheck`` passes with the CA, fails without."""

    def probe(**env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "bmcell.healthcheck", GRPC_SERVICES["selector"]],
            env={**os.environ, "BMCELL_GRPC_PORT": str(stack.config.port("selector")), **env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert probe().returncode == 0
    refused = probe(BMCELL_TLS_CA=str(other_ca.tls_ca))
    assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr


def test_triton_grpc_serves_tls_only(stack: Stack, other_ca: TlsSettings) -> None:
    addr = stack.config.addr("triton_grpc")
    served = triton.client(addr, stack_tls(stack.config))
    try:
        assert served.is_server_live()
    finally:
        served.close()
    for client in (
        grpcclient.InferenceServerClient(url=addr),
        triton.client(addr, other_ca),
    ):
        try:
            with pytest.raises(InferenceServerException):
                client.is_server_live(client_timeout=5)
        finally:
            client.close()


def test_labelapi_serves_https_only(stack: Stack, other_ca: TlsSettings) -> None:
    url = labelapi_url(stack.config)
    assert url.startswith("https://")
    ours = tls.httpx_verify(stack_tls(stack.config))
    assert httpx.get(f"{url}/healthz", timeout=5, verify=ours).status_code == 200
    with pytest.raises(httpx.HTTPError):  # TLS port: a plaintext request gets no answer
        httpx.get(f"http://{stack.config.addr('labelapi')}/healthz", timeout=5)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{url}/healthz", timeout=5, verify=tls.httpx_verify(other_ca))
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{url}/healthz", timeout=5)  # the system's CAs do not know the local CA


def test_s3_serves_https_only(stack: Stack, other_ca: TlsSettings) -> None:
    settings = load(Settings)
    assert settings.s3_secure and settings.tls == "on"
    store = ObjectStore(settings).ensure_buckets()
    key = store.put(f"tls-test/{uuid.uuid4().hex}", b"over TLS")
    assert store.get(key) == b"over TLS"
    plain = Minio(
        settings.s3_endpoint,
        access_key=settings.s3_access_key.get_secret_value(),
        secret_key=settings.s3_secret_key.get_secret_value(),
        secure=False,
    )
    with pytest.raises(MinioException):  # the HTTPS port answers a plaintext request 400
        plain.get_object(settings.data_bucket, key)
    untrusted = settings.model_copy(update={"tls_ca": other_ca.tls_ca})
    with pytest.raises(Unavailable) as refused:
        ObjectStore(untrusted, timeout_s=5).get(key)
    # The client is told "unreachable"; the TLS failure is in the detail, for the log.
    assert "CERTIFICATE_VERIFY_FAILED" in (refused.value.detail or "")


def test_postgres_refuses_plaintext(stack: Stack, other_ca: TlsSettings) -> None:
    url = load(Settings).database_url
    encrypted = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
    with psycopg.connect(url) as conn:  # PGSSLMODE=verify-full from the stack's env
        assert conn.execute(encrypted).fetchone() == (True,)
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(url, sslmode="disable", connect_timeout=5)
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(url, sslrootcert=str(other_ca.tls_ca), connect_timeout=5)


def test_tls_off_is_plaintext_and_warned(stack: Stack) -> None:
    """A debugging process with BMCELL_TLS=off serves plaintext and says so in its log."""
    port, metrics = free_port(), free_port()
    env = {
        **os.environ,
        **stack.env(),
        "BMCELL_TLS": "off",
        "BMCELL_GRPC_PORT": str(port),
        "BMCELL_METRICS_PORT": str(metrics),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.selector"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, proc.stderr.read()[-2000:]
                assert time.monotonic() < deadline, "selector with BMCELL_TLS=off did not serve"
                try:
                    if health(ch) == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.3)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "BMCELL_TLS=off" in err and '"level": "warning"' in err, err[-2000:]
