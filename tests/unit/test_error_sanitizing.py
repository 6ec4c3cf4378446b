"""What a client is told when Postgres or object storage fails: a generic message and a
request id, never the driver's or the store's own text (that goes to the server log).

Real components, really down: a Postgres address nothing listens on, an S3 endpoint
nothing listens on, a real gRPC server with bmcell's interceptor.
"""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
from fastapi.testclient import TestClient

from bmcell import db as dbmod
from bmcell import log
from bmcell.errors import Unavailable
from bmcell.grpc_server import ErrorAndMetricsInterceptor
from bmcell.runtime import Runtime
from bmcell.settings import LabelApiSettings
from bmcell.storage import ObjectStore
from services.labelapi.app import create_app
from tests.conftest import free_port


@pytest.fixture
def down() -> LabelApiSettings:
    port = free_port()  # nothing listens here: Postgres and S3 are "down"
    return LabelApiSettings(
        database_url=f"postgresql://secret_user:hunter2@127.0.0.1:{port}/patients",
        s3_endpoint=f"127.0.0.1:{port}",
        outbound_timeout_s=2,
    )


def test_object_storage_failures_keep_their_text_for_the_log(down: LabelApiSettings) -> None:
    store = ObjectStore(down)
    with pytest.raises(Unavailable) as err:
        store.get("fields/ab/patient-key.png")
    assert err.value.message == "object storage is unreachable"
    assert "patient-key" in err.value.detail and str(down.s3_endpoint) not in str(err.value)


def test_labelapi_answers_503_with_a_request_id_and_no_database_text(
    down: LabelApiSettings,
) -> None:
    db = dbmod.Database(down)  # never opened: every use fails like a lost server
    runtime = Runtime(down, db, ObjectStore(down), log.get("test"))
    with TestClient(create_app(runtime), raise_server_exceptions=False) as client:
        resp = client.get("/v1/me", headers={"Authorization": "Bearer bmc_whatever"})
    assert resp.status_code == 503, resp.text
    body = resp.json()
    assert body["error"] == "the database is unavailable" and len(body["request_id"]) == 16
    for secret in ("hunter2", "secret_user", "patients", "pool"):
        assert secret not in resp.text


def _serve(behaviour) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[ErrorAndMetricsInterceptor()])
    handler = grpc.method_handlers_generic_handler(
        "test.Sanitize", {"Call": grpc.unary_unary_rpc_method_handler(behaviour)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize(
    ("raised", "code", "said"),
    [
        (
            Unavailable("the database is unavailable", detail="FATAL: password for hunter2"),
            grpc.StatusCode.UNAVAILABLE,
            "the database is unavailable (request id ",
        ),
        (
            RuntimeError("duplicate key value violates hunter2"),
            grpc.StatusCode.INTERNAL,
            "internal error in Call; see the server log, request id ",
        ),
    ],
)
def test_grpc_errors_carry_a_request_id_not_the_raw_text(raised, code, said) -> None:
    def behaviour(request, context):
        raise raised

    server, address = _serve(behaviour)
    try:
        with grpc.insecure_channel(address) as ch:
            call = ch.unary_unary("/test.Sanitize/Call")
            with pytest.raises(grpc.RpcError) as err:
                call(b"", timeout=10)
    finally:
        server.stop(0)
    assert err.value.code() == code
    assert err.value.details().startswith(said) and "hunter2" not in err.value.details()
