"""Every gRPC method and every labeling API route, called by every kind of caller.

The calls are read from the services' descriptors and the FastAPI app, so a method or
route added later is called too (and fails here until it has a request below). Each
cell of the matrix must answer as bmcell.policy says:

- no token, an expired token, a revoked token: UNAUTHENTICATED / 401;
- a role the rule does not list: PERMISSION_DENIED / 403;
- a role of another lab, on a call that names lab A's data: NOT_FOUND / 404, or an
  answer that holds nothing of lab A (PERMISSION_DENIED for an upload to lab A);
- a role the rule lists: anything but those refusals (and no server error).

Refused callers send the request that would change something (a real upload, a round
start, a label correction...); allowed callers send a harmless one. Every refusal
runs before any allowed call, between two snapshots of Postgres (every table, row by
row) and object storage: they must be equal.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from types import SimpleNamespace

import grpc
import httpx
import numpy as np
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from PIL import Image
from psycopg import sql

from bmcell import policy, tls
from bmcell import users as user_repo
from bmcell.auth import ALL_LAB_ROLES, authenticate, current_principal
from bmcell.db import Database
from bmcell.grpc_auth import AuthInterceptor
from bmcell.grpc_client import bearer
from bmcell.grpc_server import ErrorAndMetricsInterceptor
from bmcell.settings import LabelApiSettings, Settings
from bmcell.stack import Stack
from bmcell.stack.components import GRPC_SERVICES
from bmcell.storage import ObjectStore
from bmcell.v1 import (
    classifier_pb2,
    rounds_pb2,
    segmenter_pb2,
    selector_pb2,
    trainer_pb2,
    trainer_pb2_grpc,
)
from services.labelapi.app import create_app, route_calls
from tests.integration.seed import seed_cells, synth_crops

pytestmark = pytest.mark.integration

NOWHERE = 987_654_321  # an id no test creates
REFUSED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
BROKEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
# Callers without a working token, by how their token fails.
NO_TOKEN = ("none", "expired", "revoked")
# Callers with a role; *_b belong to lab B and call about lab A's data.
ROLE_CALLERS = {
    "uploader": "uploader",
    "reviewer": "reviewer",
    "operator": "operator",
    "admin": "admin",
    "service": "service",
    "uploader_b": "uploader",
    "reviewer_b": "reviewer",
}


@dataclass(frozen=True)
class World:
    lab_a: str
    specimen_a: str
    cell: int  # lab A, unlabelled, in the pool
    labelled: int  # lab A, labelled LY
    task: int  # lab A, an open CST task
    round_id: int  # created, not driven: nothing moves it but these calls
    tokens: dict[str, str | None]


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(rt: tuple[Settings, Database, ObjectStore]) -> World:
    _, db, store = rt
    tag = uuid.uuid4().hex[:8]
    lab_a, lab_b, specimen_a = f"mx-a-{tag}", f"mx-b-{tag}", f"mx-s-{tag}"
    crops, _ = synth_crops(3, seed=41)
    cell, labelled, tasked = seed_cells(db, store, crops, lab=lab_a, specimen=specimen_a)
    seed_cells(db, store, crops[:1], lab=lab_b)
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO labels (cell_id, class_code, source) VALUES (%s, 'LY', 'initial')",
            (labelled,),
        )
        conn.execute("UPDATE cells SET status = 'labelled' WHERE id = %s", (labelled,))
        conn.execute("UPDATE cells SET status = 'pending' WHERE id = %s", (tasked,))
        task = conn.execute(
            """INSERT INTO review_tasks (cell_id, kind, suggested_class)
               VALUES (%s, 'cst', 'MB') RETURNING id""",
            (tasked,),
        ).fetchone()["id"]
        round_id = conn.execute(
            "INSERT INTO rounds (experiment, number, strategy) VALUES (%s, 1, 'cst+al') "
            "RETURNING id",
            (f"matrix-{tag}",),
        ).fetchone()["id"]
        tokens: dict[str, str | None] = {"none": None}
        labs = {"uploader_b": [lab_b], "reviewer_b": [lab_b]}
        for caller, role in {**ROLE_CALLERS, "expired": "admin", "revoked": "admin"}.items():
            name = f"mx-{caller}-{tag}"
            own = [] if role in ALL_LAB_ROLES else [lab_a]
            user_repo.add_user(conn, name, role, labs.get(caller, own))
            tokens[caller] = user_repo.issue_token(conn, name, 1).token
        conn.execute(
            "UPDATE api_tokens SET expires_at = now() - interval '1 s' WHERE prefix = %s",
            (tokens["expired"][:12],),
        )
        user_repo.revoke(conn, name=f"mx-revoked-{tag}", token_prefix=None)
    return World(lab_a, specimen_a, cell, labelled, task, round_id, tokens)


# --- what each call sends ----------------------------------------------------------------


def _upload(lab: str, specimen: str, data: bytes) -> Iterator[segmenter_pb2.UploadRequest]:
    header = segmenter_pb2.UploadHeader(lab=lab, specimen=specimen, filename="f.png")
    yield segmenter_pb2.UploadRequest(header=header)
    yield segmenter_pb2.UploadRequest(chunk=data)


def grpc_requests(
    w: World, *, served: bool = True
) -> dict[str, tuple[Callable[[], object], Callable[[], object] | None]]:
    """Full method name -> (request that would change something, harmless request);
    a read-only call sends the same request both times. ``served``: a model version
    is active, so a rollback by an allowed caller would change what is served."""

    def same(make: Callable[[], object]) -> tuple[Callable[[], object], Callable[[], object]]:
        return make, make

    spec = f"mx-new-{uuid.uuid4().hex[:6]}"
    return {
        "/bmcell.v1.Segmenter/Upload": (
            lambda: _upload(w.lab_a, spec, _png(int(uuid.uuid4().int % 10**6))),
            lambda: _upload(w.lab_a, "not a code", b"x"),
        ),
        "/bmcell.v1.Segmenter/ListCells": same(
            lambda: segmenter_pb2.ListCellsRequest(specimen=w.specimen_a)
        ),
        "/bmcell.v1.Classifier/Classify": same(
            lambda: classifier_pb2.ClassifyRequest(cell_ids=[w.cell])
        ),
        "/bmcell.v1.Classifier/PredictPool": (
            lambda: classifier_pb2.PredictPoolRequest(cell_ids=[w.cell]),
            lambda: classifier_pb2.PredictPoolRequest(cell_ids=[NOWHERE]),
        ),
        "/bmcell.v1.Classifier/ListModels": same(classifier_pb2.ListModelsRequest),
        "/bmcell.v1.Classifier/ActivateModel": (
            lambda: classifier_pb2.ActivateModelRequest(version=1),
            lambda: classifier_pb2.ActivateModelRequest(version=NOWHERE),
        ),
        # Harmless only with nothing served (FAILED_PRECONDITION); else not sent.
        "/bmcell.v1.Classifier/RollbackModel": (
            classifier_pb2.RollbackModelRequest,
            None if served else classifier_pb2.RollbackModelRequest,
        ),
        "/bmcell.v1.Selector/SelectCandidates": (
            lambda: selector_pb2.SelectCandidatesRequest(round_id=w.round_id, strategy="cst+al"),
            lambda: selector_pb2.SelectCandidatesRequest(round_id=NOWHERE, strategy="cst+al"),
        ),
        "/bmcell.v1.Selector/GetSelection": same(
            lambda: selector_pb2.GetSelectionRequest(round_id=w.round_id)
        ),
        "/bmcell.v1.Trainer/StartTraining": (
            lambda: trainer_pb2.StartTrainingRequest(round_id=w.round_id, epochs=1),
            lambda: trainer_pb2.StartTrainingRequest(round_id=NOWHERE, epochs=1),
        ),
        "/bmcell.v1.Trainer/GetJob": same(lambda: trainer_pb2.GetJobRequest(job_id="nowhere")),
        "/bmcell.v1.Trainer/WatchJob": same(lambda: trainer_pb2.GetJobRequest(job_id="nowhere")),
        "/bmcell.v1.Trainer/CancelJob": same(lambda: trainer_pb2.GetJobRequest(job_id="nowhere")),
        "/bmcell.v1.Trainer/GetModelReport": same(
            lambda: trainer_pb2.GetModelReportRequest(version=NOWHERE)
        ),
        "/bmcell.v1.Rounds/StartRound": (
            lambda: rounds_pb2.StartRoundRequest(experiment=f"mx-{spec}", strategy="bootstrap"),
            lambda: rounds_pb2.StartRoundRequest(experiment=f"mx-{spec}", strategy="nope"),
        ),
        "/bmcell.v1.Rounds/GetRound": same(lambda: rounds_pb2.GetRoundRequest(round_id=w.round_id)),
        "/bmcell.v1.Rounds/ListRounds": same(rounds_pb2.ListRoundsRequest),
        # The matrix's round has not failed: an allowed retry is refused, nothing changes.
        "/bmcell.v1.Rounds/RetryRound": same(
            lambda: rounds_pb2.RetryRoundRequest(round_id=w.round_id)
        ),
    }


def _crop_png() -> bytes:
    """A small crop to import (``bmcell import``'s route)."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (150, 60, 160)).save(buf, "PNG")
    return buf.getvalue()


def http_requests(w: World) -> dict[str, tuple[dict, dict]]:
    """ "METHOD /template" -> (request that would change something, harmless request),
    each as httpx.request keyword arguments."""
    stale = {"lease_token": str(uuid.UUID(int=7))}
    cell, lab = f"/v1/cells/{w.labelled}", w.lab_a
    person = f"mx-reviewer-{w.lab_a.removeprefix('mx-a-')}"
    crops = f"/v1/labs/{lab}/specimens/{w.specimen_a}/crops"

    def same(url: str, body: dict | None = None) -> tuple[dict, dict]:
        request = {"url": url} if body is None else {"url": url, "json": body}
        return request, request

    return {
        "GET /": same("/"),
        "GET /static": same("/static/app.js"),
        "GET /healthz": same("/healthz"),
        "GET /metrics": same("/metrics"),
        "GET /openapi.json": same("/openapi.json"),
        "GET /docs": same("/docs"),
        "GET /docs/oauth2-redirect": same("/docs/oauth2-redirect"),
        "GET /redoc": same("/redoc"),
        "GET /v1/me": same("/v1/me"),
        "GET /v1/taxonomy": same("/v1/taxonomy"),
        "POST /v1/tasks/next": (
            {"url": f"/v1/tasks/next?lab={lab}"},
            # Leases nothing: lab A has no adjudication task (reviewers may not ask).
            {"url": f"/v1/tasks/next?lab={lab}&kind=adjudication"},
        ),
        "POST /v1/tasks/page": (
            {"url": f"/v1/tasks/page?lab={lab}&size=2"},
            {"url": f"/v1/tasks/page?lab={lab}&kind=adjudication"},
        ),
        "GET /v1/tasks/{task_id}": same(f"/v1/tasks/{w.task}"),
        # A lease nobody holds: answered 409 by the allowed, so nothing changes.
        "POST /v1/tasks/{task_id}/submit": same(
            f"/v1/tasks/{w.task}/submit", {**stale, "answer": "confirm"}
        ),
        "POST /v1/tasks/{task_id}/release": same(f"/v1/tasks/{w.task}/release", stale),
        "POST /v1/tasks": (
            {"url": "/v1/tasks", "json": {"kind": "test", "cell_ids": [w.cell]}},
            # An already-labelled cell is skipped: nothing is created.
            {"url": "/v1/tasks", "json": {"kind": "test", "cell_ids": [w.labelled]}},
        ),
        "GET /v1/cells/{cell_id}": same(cell),
        "GET /v1/cells/{cell_id}/image": same(f"{cell}/image"),
        "GET /v1/cells/{cell_id}/field": same(f"{cell}/field?size=128"),
        "PUT /v1/cells/{cell_id}/label": (
            {"url": f"{cell}/label", "json": {"class_code": "MO"}},
            {"url": f"{cell}/label", "json": {"class_code": "LY"}},  # as it is
        ),
        "GET /v1/labels/export": same(f"/v1/labels/export?lab={lab}&format=json"),
        "GET /v1/rounds/current/progress": same("/v1/rounds/current/progress"),
        "GET /v1/specimens/{lab}/{specimen}/report": same(
            f"/v1/specimens/{lab}/{w.specimen_a}/report"
        ),
        "GET /v1/labs": same("/v1/labs"),
        "POST /v1/labs": (
            {"url": "/v1/labs", "json": {"code": f"{lab}-new"}},
            {"url": "/v1/labs", "json": {"code": lab}},  # exists: 409
        ),
        "GET /v1/specimens": same(f"/v1/specimens?lab={lab}"),
        "PUT /v1/specimens/{lab}/{specimen}/role": (
            {"url": f"/v1/specimens/{lab}/{w.specimen_a}/role", "json": {"role": "excluded"}},
            # Its role already: nothing changes.
            {"url": f"/v1/specimens/{lab}/{w.specimen_a}/role", "json": {"role": "training"}},
        ),
        "GET /v1/users": same("/v1/users"),
        "POST /v1/users": (
            {"url": "/v1/users", "json": {"name": f"{person}-new", "role": "operator"}},
            {"url": "/v1/users", "json": {"name": person, "role": "operator"}},  # exists: 409
        ),
        "PATCH /v1/users/{name}": (
            {"url": f"/v1/users/{person}", "json": {"disabled": True}},
            {"url": f"/v1/users/{person}", "json": {"disabled": False}},  # as it is
        ),
        "POST /v1/users/{name}/tokens": (
            {"url": f"/v1/users/{person}/tokens", "json": {}},
            {"url": f"/v1/users/{person}-nobody/tokens", "json": {}},  # no such user: 404
        ),
        "POST /v1/labs/{lab}/specimens/{specimen}/crops": (
            {"url": f"{crops}?class=LY", "content": _crop_png()},
            # A class the taxonomy does not have: refused before anything is written.
            {"url": f"{crops}?class=NOPE", "content": _crop_png()},
        ),
        "POST /v1/specimens/{lab}/{specimen}/predict": same(
            f"/v1/specimens/{lab}/{w.specimen_a}/predict"
        ),
        "POST /v1/specimens/{lab}/{specimen}/report/verify": (
            {"url": f"/v1/specimens/{lab}/{w.specimen_a}/report/verify", "json": {}},
            # A digest no report has: refused 409, so no sign-off is stored.
            {
                "url": f"/v1/specimens/{lab}/{w.specimen_a}/report/verify",
                "json": {"digest": "0" * 64},
            },
        ),
    }


# --- expectations ------------------------------------------------------------------------


def expected(rule: policy.Rule, caller: str) -> str:
    """ "open", "unauthenticated", "denied", "hidden" (another lab's data) or "allowed"."""
    if rule.open:
        return "open"
    if caller in NO_TOKEN:
        return "unauthenticated"
    if ROLE_CALLERS[caller] not in rule.roles:
        return "denied"
    if caller.endswith("_b") and rule.scope == "request":
        return "hidden"
    return "allowed"


def snapshot(db: Database, store: ObjectStore) -> dict[str, object]:
    """Every table's rows (as text, sorted) and every object's key."""
    state: dict[str, object] = {}
    with db.connection() as conn:
        tables = [
            r["table_name"]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY 1"
            )
        ]
        for t in tables:
            state[t] = conn.execute(
                sql.SQL(
                    "SELECT count(*) AS n, md5(string_agg(x::text, '|' ORDER BY x::text)) "
                    "AS digest FROM {} x"
                ).format(sql.Identifier(t))
            ).fetchone()
    for bucket in (store.data_bucket, store.models_bucket):
        state[f"s3:{bucket}"] = sorted(store.list("", bucket=bucket))
    return state


def grpc_method(full: str):
    """The descriptor of a full method name, from the generated modules."""
    _, service, name = full.split("/")
    for module in (segmenter_pb2, classifier_pb2, selector_pb2, trainer_pb2, rounds_pb2):
        svc = module.DESCRIPTOR.services_by_name.get(service.rsplit(".", 1)[1])
        if svc is not None and svc.full_name == service:
            return svc.methods_by_name[name]
    raise KeyError(full)


def call_grpc(channel: grpc.Channel, full: str, request, token: str | None):
    """(status code, response or None) of one call, whatever its shape."""
    method = grpc_method(full)
    out = message_factory.GetMessageClass(method.output_type)
    kinds = (method.client_streaming, method.server_streaming)
    make = {
        (False, False): channel.unary_unary,
        (True, False): channel.stream_unary,
        (False, True): channel.unary_stream,
        (True, True): channel.stream_stream,
    }[kinds]
    stub = make(
        full,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=out.FromString,
    )
    metadata = bearer(token) if token else None
    try:
        answer = stub(request, metadata=metadata, timeout=60)
        if method.server_streaming:
            answer = list(answer)
        return grpc.StatusCode.OK, answer
    except grpc.RpcError as err:
        return err.code(), err.details()


def _check_grpc(outcome: str, code: grpc.StatusCode, answer, lab_a: str) -> bool:
    if outcome == "unauthenticated":
        return code == grpc.StatusCode.UNAUTHENTICATED
    if outcome == "denied":
        return code == grpc.StatusCode.PERMISSION_DENIED
    if outcome == "hidden":
        if code == grpc.StatusCode.OK:
            return lab_a not in str(answer)
        return code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED)
    return code not in REFUSED | BROKEN


def _check_http(outcome: str, resp: httpx.Response, lab_a: str) -> bool:
    status = resp.status_code
    if outcome == "open":
        return status == 200
    if outcome == "unauthenticated":
        return status == 401
    if outcome == "denied":
        return status == 403
    if outcome == "hidden":
        return status == 404 or (status < 300 and lab_a not in resp.text)
    return status not in (401, 403) and status < 500


# --- the matrix ----------------------------------------------------------------------------


def test_matrix_covers_every_method_and_route(world: World) -> None:
    assert sorted(grpc_requests(world)) == sorted(policy.proto_methods())
    app = create_app(
        SimpleNamespace(
            settings=LabelApiSettings(database_url="postgresql://x@h/x", s3_endpoint="h:1"),
            db=None,
            store=None,
        )
    )
    routes = {f"{m} {p}" for m, p in route_calls(app)}
    assert sorted(http_requests(world)) == sorted(routes)


def test_grpc_matrix(world: World, stack: Stack, rt) -> None:
    settings, db, store = rt
    with db.connection() as conn:
        served = conn.execute(
            "SELECT 1 FROM model_versions WHERE model_name = %s AND state = 'active'",
            (settings.model_name,),
        ).fetchone()
    requests = grpc_requests(world, served=served is not None)
    addr = {
        f"bmcell.v1.{full.split('.')[-1]}": stack.config.addr(n)
        for n, full in GRPC_SERVICES.items()
    }
    channels = {svc: tls.grpc_channel(a) for svc, a in addr.items()}
    cells = [
        (m, c, expected(policy.GRPC[m], c)) for m in requests for c in (*NO_TOKEN, *ROLE_CALLERS)
    ]
    failures: list[str] = []
    try:
        before = snapshot(db, store)
        for method, caller, outcome in cells:
            if outcome == "allowed":
                continue
            channel = channels[method.split("/")[1]]
            code, answer = call_grpc(channel, method, requests[method][0](), world.tokens[caller])
            if not _check_grpc(outcome, code, answer, world.lab_a):
                failures.append(f"{caller} {method}: {code.name} {answer!s:.200} (want {outcome})")
        assert snapshot(db, store) == before, "a refused call changed Postgres or storage"
        for method, caller, outcome in cells:
            harmless = requests[method][1]
            if outcome != "allowed" or harmless is None:
                continue
            channel = channels[method.split("/")[1]]
            code, answer = call_grpc(channel, method, harmless(), world.tokens[caller])
            if not _check_grpc(outcome, code, answer, world.lab_a):
                failures.append(f"{caller} {method}: {code.name} {answer!s:.200} (want allowed)")
    finally:
        for ch in channels.values():
            ch.close()
    assert not failures, "\n".join(failures)


def test_http_matrix(world: World, stack: Stack, rt) -> None:
    _, db, store = rt
    requests = http_requests(world)
    cells = [
        (r, c, expected(policy.HTTP[r], c)) for r in requests for c in (*NO_TOKEN, *ROLE_CALLERS)
    ]
    failures: list[str] = []
    with httpx.Client(
        base_url=stack.env()["BMCELL_LABELAPI_URL"], timeout=60, verify=tls.httpx_verify()
    ) as client:

        def send(route: str, caller: str, which: int) -> httpx.Response:
            method = route.split(" ")[0]
            token = world.tokens[caller]
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            return client.request(method, headers=headers, **requests[route][which])

        before = snapshot(db, store)
        for route, caller, outcome in cells:
            if outcome != "allowed":
                resp = send(route, caller, 0)
                if not _check_http(outcome, resp, world.lab_a):
                    failures.append(f"{caller} {route}: {resp.status_code} {resp.text[:200]}")
        assert snapshot(db, store) == before, "a refused request changed Postgres or storage"
        for route, caller, outcome in cells:
            if outcome == "allowed":
                resp = send(route, caller, 1)
                if not _check_http(outcome, resp, world.lab_a):
                    failures.append(f"{caller} {route}: {resp.status_code} {resp.text[:200]}")
    assert not failures, "\n".join(failures)


# --- the interceptor itself ------------------------------------------------------------------


class _EchoTrainer(trainer_pb2_grpc.TrainerServicer):
    """Answers with the name of the principal the handler sees, unary and streaming."""

    def GetJob(self, request, context):
        return trainer_pb2.TrainingJob(job_id=request.job_id, message=_who())

    def WatchJob(self, request, context):
        for _ in range(3):
            yield trainer_pb2.TrainingProgress(job_id=request.job_id, message=_who())


def _who() -> str:
    principal = current_principal()
    return principal.name if principal else ""


def test_interceptor_sets_the_caller_and_guards_reflection_in_production(world: World, rt) -> None:
    """A server wired as grpc_server does, with production settings: health open,
    reflection only with a token, the handler (unary and streaming) runs as the caller."""
    _, db, _ = rt
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        interceptors=[
            ErrorAndMetricsInterceptor(),
            AuthInterceptor(lambda t: authenticate(db, t), production=True),
        ],
    )
    trainer_pb2_grpc.add_TrainerServicer_to_server(_EchoTrainer(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    reflection.enable_server_reflection(["bmcell.v1.Trainer", reflection.SERVICE_NAME], server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = trainer_pb2_grpc.TrainerStub(ch)
            operator = bearer(world.tokens["operator"])
            me = stub.GetJob(trainer_pb2.GetJobRequest(job_id="j"), metadata=operator, timeout=10)
            assert me.message.startswith("mx-operator-")
            watched = list(stub.WatchJob(trainer_pb2.GetJobRequest(job_id="j"), metadata=operator))
            assert [p.message for p in watched] == [me.message] * 3

            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

            def reflect(metadata):
                ask = reflection_pb2.ServerReflectionRequest(list_services="")
                answers = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                    iter([ask]), metadata=metadata, timeout=10
                )
                return {s.name for s in next(answers).list_services_response.service}

            with pytest.raises(grpc.RpcError) as err:
                reflect(None)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bmcell.v1.Trainer" in reflect(bearer(world.tokens["reviewer"]))
    finally:
        server.stop(0)
