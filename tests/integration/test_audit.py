"""The audit trail against the embedded stack: the database refuses to change it, every
state-changing call writes exactly one row of its action with its actor in the same
transaction, a refused call writes none, and ``bmcell audit`` filters it.

Each test finds its own rows by something only it made (a request id, a user's name,
an entity id), so rows other tests or background drivers write never interfere.

gRPC calls send an operator's token. Where the service checks tokens (the shared auth
interceptor), the row's actor is that operator; where it does not yet, the service's
own identity (``service:<name>``). :func:`grpc_actor` asks the service which it is,
so each assertion is exact either way.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import grpc
import httpx
import psycopg
import pytest
from click.testing import CliRunner
from psycopg.rows import dict_row

from bmcell import audit, modelstore, tls, users
from bmcell import db as dbmod
from bmcell.auth import Principal, acting_as, authenticate
from bmcell.cli.main import cli
from bmcell.db import Database
from bmcell.errors import FailedPrecondition
from bmcell.grpc_client import bearer
from bmcell.settings import Settings
from bmcell.stack import Stack, accounts
from bmcell.storage import ObjectStore
from bmcell.taxonomy import DEFAULT_TAXONOMY
from bmcell.v1 import (
    classifier_pb2,
    classifier_pb2_grpc,
    rounds_pb2,
    rounds_pb2_grpc,
    segmenter_pb2,
    segmenter_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from services.rounds import store as rounds_store
from services.trainer import jobs
from tests.integration.seed import MeanColour, migrate_before, seed_cells, synth_crops
from tests.integration.test_foundation import _fresh_database
from tests.integration.test_segmenter_auth import _fresh_png, _requests

pytestmark = pytest.mark.integration
TAG = uuid.uuid4().hex[:8]
Rt = tuple[Settings, Database, ObjectStore]


def rows_where(db: Database, where: str, *args: object) -> list[dict]:
    with db.connection() as conn:
        return conn.execute(f"SELECT * FROM audit_log WHERE {where} ORDER BY id", args).fetchall()


def summary(rows: list[dict]) -> list[tuple]:
    return [(r["action"], f"{r['entity']}:{r['entity_id']}", r["actor_name"]) for r in rows]


def invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def people(rt: Rt) -> dict:
    """A lab, its reviewer, an operator and an admin, with tokens and principals."""
    _, db, _ = rt
    lab = f"audit-{TAG}"
    with db.transaction() as conn:
        conn.execute("INSERT INTO labs (code) VALUES (%s)", (lab,))
    out: dict = {"lab": lab}
    for short, role, labs in (
        ("reviewer", "reviewer", [lab]),
        ("operator", "operator", []),
        ("admin", "admin", []),
    ):
        name = f"{short}-{TAG}"
        with db.transaction() as conn:
            users.add_user(conn, name, role, labs)
            token = users.issue_token(conn, name, 1).token
        out[short] = {"name": name, "token": token, "principal": authenticate(db, token)}
    return out


def grpc_actor(call_without_token, service: str, operator: str) -> str:
    """Who a call with the operator's token is recorded as (see the module doc)."""
    try:
        call_without_token()
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            return operator
    return f"service:{service}"


# --- the table cannot be edited -----------------------------------------------------


def test_update_delete_truncate_are_refused_by_the_database(stack_env: dict[str, str]) -> None:
    with psycopg.connect(
        stack_env["BMCELL_DATABASE_URL"], autocommit=True, row_factory=dict_row
    ) as conn:
        # The embedded stack connects as a superuser: privileges would not stop it.
        assert conn.execute(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone()["rolsuper"]
        probe = audit.Actor("process", f"test:{TAG}")
        row_id = audit.record(conn, "probe.write", "probe", TAG, {"n": 1}, actor=probe)
        for statement in (
            "UPDATE audit_log SET actor_name = 'someone else' WHERE id = %s",
            "DELETE FROM audit_log WHERE id = %s",
            "DELETE FROM audit_log WHERE id = %s AND false",  # even when no row matches
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                conn.execute(statement, (row_id,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="TRUNCATE is refused"):
            conn.execute("TRUNCATE audit_log")
        kept = conn.execute("SELECT * FROM audit_log WHERE id = %s", (row_id,)).fetchone()
    assert (kept["actor_kind"], kept["actor_name"], kept["detail"]) == (
        "process",
        f"test:{TAG}",
        {"n": 1},
    )


def test_migration_keeps_old_rows_readable_and_revokes_changes_from_other_roles(
    stack_env: dict[str, str],
) -> None:
    url = _fresh_database(stack_env)
    role = f"audit_services_{TAG}"
    with psycopg.connect(url, autocommit=True) as conn:
        migrate_before(conn, "0007")
        ana = conn.execute(
            "INSERT INTO users (name, role) VALUES ('ana', 'reviewer') RETURNING id"
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO audit_log (actor_id, action, entity, entity_id) VALUES "
            "(%s, 'label.review', 'cell', '1'), (NULL, 'assign_split', 'label', '1')",
            (ana,),
        )
        conn.execute(f"CREATE ROLE {role}")
        conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON audit_log TO {role}")
    try:
        assert dbmod.migrate(url) == [m.version for m in dbmod.migrations() if m.version >= "0007"]
        with psycopg.connect(url, autocommit=True) as conn:
            old = conn.execute(
                "SELECT actor_kind, actor_name, actor_role FROM audit_log ORDER BY id"
            ).fetchall()
            may = {
                p: conn.execute(
                    "SELECT has_table_privilege(%s, 'audit_log', %s)", (role, p)
                ).fetchone()[0]
                for p in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE")
            }
        assert old == [("person", "ana", "reviewer"), ("process", "unrecorded", None)]
        assert may == {
            "SELECT": True,
            "INSERT": True,
            "UPDATE": False,
            "DELETE": False,
            "TRUNCATE": False,
        }
    finally:
        admin = url.rsplit("/", 1)[0] + "/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {url.rsplit('/', 1)[1]}")
            conn.execute(f"DROP ROLE {role}")


# --- people and tokens (the CLI: the labeling API as an admin; revoke server-side) ----


def test_user_and_token_changes_are_audited_and_read_back_by_the_cli(
    rt: Rt, people: dict, stack: Stack
) -> None:
    _, db, _ = rt
    name, lab = f"ana-{TAG}", people["lab"]
    admin = stack.admin_token()
    refused = [
        ("users", "add", name, "--role", "reviewer", "--lab", "no-such-lab"),
        ("users", "disable", f"nobody-{TAG}"),
    ]
    steps = [
        ("users", "add", name, "--role", "reviewer", "--lab", lab),
        ("users", "set", name, "--role", "uploader"),
        ("users", "add", name, "--role", "reviewer", "--lab", lab),  # exists: refused
        ("users", "token", name),
        ("users", "set", name, "--role", "operator"),
        ("users", "set", name, "--role", "reviewer"),  # needs --lab: refused
        ("users", "disable", name),
        ("users", "disable", name),  # already disabled: no change
        ("users", "enable", name),
        ("users", "revoke", name),
    ]
    outputs = []
    for args in refused + steps:
        result = CliRunner().invoke(cli, list(args), env={"BMCELL_TOKEN": admin})
        outputs.append(result.output)
    token = next(o.strip() for o in outputs if o.strip().startswith("bmc_"))
    rows = rows_where(db, "entity = 'user' AND entity_id = %s", name)
    login = audit.cli_identity()
    by_admin = ("person", accounts.ADMIN)
    assert [(r["action"], r["actor_kind"], r["actor_name"]) for r in rows] == [
        ("user.add", *by_admin),
        ("user.change", *by_admin),
        ("token.issue", *by_admin),
        ("user.change", *by_admin),
        ("user.disable", *by_admin),
        ("user.enable", *by_admin),
        ("token.revoke", "process", login),
    ]
    assert rows[1]["before"] == {"role": "reviewer", "labs": [lab]}
    assert rows[1]["after"] == {"role": "uploader", "labs": [lab]}
    assert rows[3]["after"] == {"role": "operator", "labs": []}
    prefix = rows[2]["detail"]["prefix"]
    assert token.startswith(prefix) and rows[6]["detail"] == {"prefixes": [prefix]}
    assert token not in json.dumps([r["detail"] for r in rows], default=str)
    assert not rows_where(db, "entity = 'user' AND entity_id = %s", f"nobody-{TAG}")

    # The CLI reads it back newest first, filtered by entity, actor and time.
    listed = [
        json.loads(line)
        for line in invoke("audit", "--entity", f"user:{name}", "--json").splitlines()
    ]
    assert [r["action"] for r in listed] == [r["action"] for r in reversed(rows)]
    assert len(invoke("audit", "--entity", f"user:{name}", "--limit", "2").splitlines()) == 2
    since = rows[4]["at"].isoformat()
    recent = invoke("audit", "--entity", f"user:{name}", "--since", since, "--json")
    assert [json.loads(line)["action"] for line in recent.splitlines()] == [
        "token.revoke",
        "user.enable",
        "user.disable",
    ]
    mine = invoke(
        "audit", "--actor", accounts.ADMIN, "--since", rows[0]["at"].isoformat(), "--json"
    )
    assert {json.loads(line)["id"] for line in mine.splitlines()} >= {r["id"] for r in rows[:6]}
    bad = CliRunner().invoke(cli, ["audit", "--since", "tomorrow"])
    assert bad.exit_code == 2 and "ISO 8601" in bad.output


# --- the labeling API: answers, corrections, task creation, exports ---------------


def test_labelapi_writes_one_row_per_change_with_the_caller(
    rt: Rt, stack: Stack, people: dict
) -> None:
    settings, db, store = rt
    crops, _ = synth_crops(2, seed=3)
    cells = seed_cells(db, store, crops, lab=people["lab"])
    url = stack.env()["BMCELL_LABELAPI_URL"]

    def call(who: str, method: str, path: str, **kwargs) -> tuple[httpx.Response, list[tuple]]:
        rid = f"audit-{uuid.uuid4().hex[:12]}"
        headers = {"Authorization": f"Bearer {people[who]['token']}", "X-Request-ID": rid}
        with httpx.Client(base_url=url, timeout=60, verify=tls.httpx_verify()) as c:
            response = c.request(method, path, headers=headers, **kwargs)
        assert response.headers["x-request-id"] == rid
        return response, summary(rows_where(db, "request_id = %s", rid))

    reviewer, operator, admin = (people[k]["name"] for k in ("reviewer", "operator", "admin"))
    created, audited = call(
        "operator",
        "POST",
        "/v1/tasks",
        json={"kind": "initial", "cell_ids": cells, "required_reviews": 1},
    )
    assert created.status_code == 201 and audited == [
        ("review_tasks.create", "round:none", operator)
    ]
    again, audited = call(
        "operator", "POST", "/v1/tasks", json={"kind": "initial", "cell_ids": cells}
    )
    assert again.json()["created"] == [] and audited == []  # nothing new, nothing recorded

    lab = {"lab": people["lab"]}
    task, audited = call("reviewer", "POST", "/v1/tasks/next", params=lab)
    assert task.status_code == 200 and audited == []  # a lease is a reservation, not a change
    body = {"lease_token": task.json()["lease_token"], "answer": "correct", "class_code": "XX"}
    path = f"/v1/tasks/{task.json()['task_id']}/submit"
    refused, audited = call("reviewer", "POST", path, json=body)
    assert refused.status_code == 400 and audited == []
    body["class_code"] = "MB"
    answered, audited = call("reviewer", "POST", path, json=body)
    cell = task.json()["cell"]["id"]
    assert answered.json()["status"] == "labelled"
    assert audited == [
        ("review.answer", f"review_task:{task.json()['task_id']}", reviewer),
        ("label.review", f"cell:{cell}", reviewer),
    ]
    replayed, audited = call("reviewer", "POST", path, json=body)
    assert replayed.json()["replayed"] and audited == []

    label = f"/v1/cells/{cell}/label"
    refused, audited = call("admin", "PUT", label, json={"class_code": "nope"})
    assert refused.status_code == 400 and audited == []
    corrected, audited = call("admin", "PUT", label, json={"class_code": "PMC", "note": "x"})
    assert corrected.status_code == 200 and audited == [("label.correct", f"cell:{cell}", admin)]
    [correction] = rows_where(db, "action = 'label.correct' AND entity_id = %s", str(cell))
    assert (correction["actor_kind"], correction["actor_role"]) == ("person", "admin")
    assert (correction["before"]["class_code"], correction["after"]["class_code"]) == ("MB", "PMC")

    refused, audited = call("reviewer", "GET", "/v1/labels/export", params={"class": "nope"})
    assert refused.status_code == 400 and audited == []
    exported, audited = call(
        "reviewer", "GET", "/v1/labels/export", params={"format": "json", **lab}
    )
    assert exported.status_code == 200 and len(audited) == 1
    assert audited[0][0] == "labels.export" and audited[0][2] == reviewer
    [row] = rows_where(db, "request_id = %s", exported.headers["x-request-id"])
    # Recorded as the export starts (it streams): the filter, not a row count.
    assert exported.json()["count"] == 1
    assert row["detail"]["class"] is None and len(row["detail"]["lab_ids"]) == 1
    history = httpx.get(
        f"{url}/v1/cells/{cell}",
        headers={"Authorization": f"Bearer {people['admin']['token']}"},
        timeout=30,
        verify=tls.httpx_verify(),
    ).json()["history"]
    assert [(h["action"], h["actor"]) for h in history] == [
        ("label.review", reviewer),
        ("label.correct", admin),
    ]


# --- the gRPC services ------------------------------------------------------------


@pytest.fixture(scope="module")
def channels(stack: Stack) -> Iterator[dict[str, grpc.Channel]]:
    names = ("segmenter", "classifier", "rounds", "trainer")
    chans = {n: tls.grpc_channel(stack.config.addr(n)) for n in names}
    yield chans
    for ch in chans.values():
        ch.close()


def test_upload_is_audited_with_its_uploader_and_refusals_write_nothing(
    rt: Rt, people: dict, channels: dict
) -> None:
    _, db, _ = rt
    stub = segmenter_pb2_grpc.SegmenterStub(channels["segmenter"])
    data, specimen = _fresh_png(), f"s-{uuid.uuid4().hex[:10]}"

    def upload(who: str) -> segmenter_pb2.UploadResponse:
        meta = bearer(people[who]["token"])
        return stub.Upload(_requests(data, people["lab"], specimen), metadata=meta, timeout=180)

    def uploads() -> list[dict]:
        return rows_where(db, "action = 'field.upload' AND detail->>'specimen' = %s", specimen)

    with pytest.raises(grpc.RpcError) as err:
        upload("reviewer")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and uploads() == []
    first = upload("operator")
    assert not first.duplicate
    assert upload("operator").duplicate  # the same bytes again: nothing changes
    [row] = uploads()
    assert summary([row]) == [
        ("field.upload", f"field:{first.field_id}", people["operator"]["name"])
    ]
    assert row["detail"]["cells"] == first.cells and "filename" not in row["detail"]


def test_round_start_and_retry_are_audited_in_the_rounds_transaction(
    rt: Rt, people: dict, channels: dict
) -> None:
    _, db, _ = rt
    stub = rounds_pb2_grpc.RoundsStub(channels["rounds"])
    meta = bearer(people["operator"]["token"])
    experiment = f"audit-{TAG}"
    for request, code in (
        (rounds_pb2.StartRoundRequest(experiment=experiment, strategy="magic"), "INVALID_ARGUMENT"),
        (
            rounds_pb2.StartRoundRequest(experiment=experiment, strategy="cst"),
            "FAILED_PRECONDITION",
        ),
    ):
        with pytest.raises(grpc.RpcError) as err:
            stub.StartRound(request, metadata=meta, timeout=30)
        assert err.value.code().name == code
    assert rows_where(db, "action LIKE 'round.%%' AND detail->>'experiment' = %s", experiment) == []

    # Started in-process under the operator, and rolled back so the round driver never
    # works on it: the rows exist exactly as long as the round does.
    operator: Principal = people["operator"]["principal"]
    with db.connection() as conn, acting_as(operator):
        with conn.transaction(force_rollback=True):
            first = rounds_store.create(conn, experiment, "bootstrap", {"gate": 0.8})
            rounds_store.set_state(conn, first["id"], "failed", "test")
            second = rounds_store.create(conn, experiment, "bootstrap", {"gate": 0.8})
            with pytest.raises(FailedPrecondition):
                rounds_store.create(conn, experiment, "cst", {})
            rows = conn.execute(
                "SELECT * FROM audit_log WHERE entity = 'round' AND entity_id = ANY(%s) ORDER BY id",
                ([str(first["id"]), str(second["id"])],),
            ).fetchall()
        assert summary(rows) == [
            ("round.start", f"round:{first['id']}", operator.name),
            ("round.retry", f"round:{second['id']}", operator.name),
        ]
        assert rows[1]["detail"]["retry_of"] == first["id"]
        assert rows[0]["detail"]["params"] == {"gate": 0.8}
    assert rows_where(db, "entity = 'round' AND entity_id = %s", str(first["id"])) == []


def test_training_start_and_cancel_are_audited(rt: Rt, people: dict, channels: dict) -> None:
    _, db, _ = rt
    stub = trainer_pb2_grpc.TrainerStub(channels["trainer"])
    operator = people["operator"]
    meta = bearer(operator["token"])
    expected = grpc_actor(
        lambda: stub.GetJob(trainer_pb2.GetJobRequest(job_id="train-none"), timeout=30),
        "trainer",
        operator["name"],
    )
    with acting_as(operator["principal"]):
        job = jobs.create(db, None, {"epochs": 1, "max_accuracy_drop": 0.01, "train": [1, 2]}, 1)
    cancel = trainer_pb2.GetJobRequest(job_id=job["id"])
    assert stub.CancelJob(cancel, metadata=meta, timeout=30).state == "cancelled"
    assert stub.CancelJob(cancel, metadata=meta, timeout=30).state == "cancelled"  # no change
    with pytest.raises(grpc.RpcError) as err:
        stub.CancelJob(trainer_pb2.GetJobRequest(job_id=f"train-{TAG}"), metadata=meta, timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert rows_where(db, "entity = 'training_job' AND entity_id = %s", f"train-{TAG}") == []
    rows = rows_where(db, "entity = 'training_job' AND entity_id = %s", job["id"])
    assert summary(rows) == [
        ("training.start", f"training_job:{job['id']}", operator["name"]),
        ("training.cancel", f"training_job:{job['id']}", expected),
    ]
    # The gate setting is kept; the plan's cell lists only by size.
    assert rows[0]["detail"] == {
        "epochs": 1,
        "max_accuracy_drop": 0.01,
        "train_cells": 2,
        "validation_cells": 0,
        "test_cells": 0,
    }


def test_model_activation_and_rollback_are_audited(rt: Rt, people: dict, channels: dict) -> None:
    settings, db, store = rt
    name = settings.model_name
    stub = classifier_pb2_grpc.ClassifierStub(channels["classifier"])
    meta = bearer(people["operator"]["token"])
    expected = grpc_actor(
        lambda: stub.ListModels(classifier_pb2.ListModelsRequest(), timeout=30),
        "classifier",
        people["operator"]["name"],
    )
    found = stub.ListModels(classifier_pb2.ListModelsRequest(), metadata=meta, timeout=30)
    a, b = (
        modelstore.register_version(
            db,
            store,
            MeanColour(s).eval(),
            DEFAULT_TAXONOMY,
            64,
            model_name=name,
            note=f"audit {s}",
        )
        for s in (1, 2)
    )
    entity = f"model_version:{name}/"
    with pytest.raises(grpc.RpcError) as err:
        stub.ActivateModel(
            classifier_pb2.ActivateModelRequest(version=b + 100), metadata=meta, timeout=60
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    for version in (a, b):
        stub.ActivateModel(
            classifier_pb2.ActivateModelRequest(version=version), metadata=meta, timeout=300
        )
    rolled = stub.RollbackModel(classifier_pb2.RollbackModelRequest(), metadata=meta, timeout=300)
    assert rolled.version == a
    rows = rows_where(
        db,
        "entity = 'model_version' AND entity_id = ANY(%s)",
        [f"{name}/{v}" for v in (a, b, b + 100)],
    )
    assert summary(rows) == [
        ("model.activate", f"{entity}{a}", expected),
        ("model.activate", f"{entity}{b}", expected),
        ("model.rollback", f"{entity}{a}", expected),
    ]
    assert (rows[2]["before"], rows[2]["after"]) == ({"active": b}, {"active": a})
    if found.active_version:  # leave the session's served model as it was
        stub.ActivateModel(
            classifier_pb2.ActivateModelRequest(version=found.active_version),
            metadata=meta,
            timeout=300,
        )
