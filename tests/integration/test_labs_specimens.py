"""Labs and specimens as managed resources, played as a new lab plays them: an admin
creates the lab and its people with the CLI (which speaks HTTP to the labeling API,
never to Postgres), an uploader uploads a test specimen and a training specimen, and
an operator changes a specimen's role, refused while its cells are in use unless
forced, and then told what the change invalidated.

The CLI runs as a subprocess with only the labeling API's URL, the segmenter's
address, the stack's CA and a token. Postgres is touched here only to check the audit
trail the calls left, and to stand in for a finished training job (one row) that
trained on the specimen's cells.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest

from bmcell import tls
from bmcell.grpc_client import bearer
from bmcell.stack import Stack, accounts
from bmcell.stack.config import REPO
from bmcell.v1 import segmenter_pb2, segmenter_pb2_grpc
from tests.integration.test_segmenter_auth import _field_png, _fresh_png

pytestmark = pytest.mark.integration

# What a lab's machine has: addresses, the CA that signed the stack's certificate, a
# token. No database or object-storage settings at all.
CLIENT_VARS = ("BMCELL_LABELAPI_URL", "BMCELL_SEGMENTER_ADDR", "BMCELL_TLS", "BMCELL_TLS_CA")


def _client_env(stack: Stack, token: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BMCELL_", "AWS_", "PG"))}
    env.update({k: v for k, v in stack.env().items() if k in CLIENT_VARS})
    # An empty run folder: the CLI must not pick settings up from a stack's env file.
    env.update(BMCELL_TOKEN=token, BMCELL_STACK_RUN_DIR=str(home), PYTHONPATH=str(REPO))
    return env


def bmcell(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bmcell.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _parallel(env: dict[str, str], *commands: tuple[str, ...]) -> list:
    """Commands that do not depend on each other, at once (each CLI start is seconds)."""
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda args: bmcell(env, *args), commands))


def _upload_refused(segmenter, token: str, lab: str, specimen: str, role: str) -> grpc.RpcError:
    header = segmenter_pb2.UploadHeader(lab=lab, specimen=specimen, role=role)
    messages = [
        segmenter_pb2.UploadRequest(header=header),
        segmenter_pb2.UploadRequest(chunk=_fresh_png()),
    ]
    with pytest.raises(grpc.RpcError) as refused:
        segmenter.Upload(iter(messages), metadata=bearer(token), timeout=60)
    return refused.value


def test_a_new_lab_through_the_cli_and_http(stack: Stack, rt, tmp_path: Path) -> None:
    _, db, _ = rt
    tag = uuid.uuid4().hex[:6]
    lab, test_spec, train_spec = f"lab-{tag}", f"t-{tag}", f"r-{tag}"
    uploader, reviewer = f"up-{tag}", f"rev-{tag}"
    admin = _client_env(stack, stack.admin_token(), tmp_path)

    # The admin creates the lab and its people, with nothing but a token.
    _ok(bmcell(admin, "labs", "add", lab, "--name", "Lab of the test"))
    *added, dup = _parallel(
        admin,
        ("users", "add", uploader, "--role", "uploader", "--lab", lab),
        ("users", "add", reviewer, "--role", "reviewer", "--lab", lab),
        ("labs", "add", lab),
    )
    for result in added:
        _ok(result)
    # A refusal is one line naming the status and the field, and exit status 1.
    assert dup.returncode == 1
    assert dup.stderr.strip() == f"error: 409 (code): lab {lab!r} already exists"
    up_token, rev_token = (
        _ok(r).strip()
        for r in _parallel(admin, ("users", "token", uploader), ("users", "token", reviewer))
    )
    assert up_token.startswith("bmc_") and rev_token.startswith("bmc_")

    # The uploader uploads a test specimen and a training one (the default role).
    fields = {spec: tmp_path / f"{spec}.png" for spec in (test_spec, train_spec)}
    fields[test_spec].write_bytes(_fresh_png())
    # 704 px: enough whole cells that two are always left in the pool, whatever the seed
    fields[train_spec].write_bytes(_field_png(int(uuid.uuid4().int % 10**9), size=704))
    up = _client_env(stack, up_token, tmp_path)
    for result in _parallel(
        up,
        ("upload", "--lab", lab, "--specimen", test_spec, "--role", "test", str(fields[test_spec])),
        ("upload", "--lab", lab, "--specimen", train_spec, str(fields[train_spec])),
    ):
        _ok(result)
    listed = json.loads(_ok(bmcell(up, "specimens", "list", "--lab", lab, "--json")))
    assert {(s["code"], s["role"], s["fields"]) for s in listed} == {
        (test_spec, "test", 1),
        (train_spec, "training", 1),
    }

    api = stack.env()["BMCELL_LABELAPI_URL"]
    operator = stack.operator_token()

    def call(token: str, method: str, path: str, **kw) -> httpx.Response:
        with httpx.Client(base_url=api, timeout=60, verify=tls.httpx_verify()) as c:
            return c.request(method, path, headers={"Authorization": f"Bearer {token}"}, **kw)

    # The lab's own people see their lab; a reviewer may not create labs.
    assert [lab_["code"] for lab_ in call(rev_token, "GET", "/v1/labs").json()["labs"]] == [lab]
    denied = call(rev_token, "POST", "/v1/labs", json={"code": f"x-{tag}"})
    assert denied.status_code == 403 and "reviewer" in denied.json()["error"]
    assert call(rev_token, "GET", "/v1/users").status_code == 403

    with tls.grpc_channel(stack.config.addr("segmenter")) as ch:
        segmenter = segmenter_pb2_grpc.SegmenterStub(ch)
        # Cells carry their field's digest, so a client can place them on its own files.
        request = segmenter_pb2.ListCellsRequest(lab=lab, specimen=train_spec)
        cells = segmenter.ListCells(request, metadata=bearer(up_token), timeout=60).cells
        # An upload never changes a specimen's role, and names the roles it knows.
        moved = _upload_refused(segmenter, up_token, lab, test_spec, "training")
        assert moved.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "bmcell specimens set-role" in moved.details()
        unknown = _upload_refused(segmenter, up_token, lab, test_spec, "holdout")
        assert unknown.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "header.role" in unknown.details()
    digest = hashlib.sha256(fields[train_spec].read_bytes()).hexdigest()
    assert cells and {c.field_sha256 for c in cells} == {digest}
    free = [c.cell_id for c in cells if c.status == "unlabelled"]
    assert len(free) >= 2, "the training field needs two cells in the pool"

    # One cell gets a training label through the labeling API, another an open task.
    made = call(
        operator,
        "POST",
        "/v1/tasks",
        json={"kind": "initial", "cell_ids": free[:2], "required_reviews": 1},
    )
    assert made.status_code == 201 and len(made.json()["created"]) == 2, made.text
    task = call(rev_token, "POST", f"/v1/tasks/next?lab={lab}&kind=initial").json()
    answer = {"lease_token": task["lease_token"], "answer": "correct", "class_code": "LY"}
    done = call(rev_token, "POST", f"/v1/tasks/{task['task_id']}/submit", json=answer)
    assert done.json()["status"] == "labelled", done.text
    labelled = task["cell"]["id"]
    # ...and a model was trained on it (a finished job's stored plan lists the cell).
    with db.transaction() as conn:
        conn.execute(
            """INSERT INTO training_jobs (id, state, config, epochs, model_version)
               VALUES (%s, 'succeeded', %s, 1, 7)""",
            (f"test-{tag}", json.dumps({"train": [["cells/x.png", 0, labelled]]})),
        )

    # Bad input is named; a used specimen's role change is refused, then forced.
    path = f"/v1/specimens/{lab}/{train_spec}/role"
    bad = call(operator, "PUT", path, json={"role": "holdout"})
    assert bad.status_code == 400 and bad.json()["field"] == "role"
    assert "holdout" in bad.json()["error"]
    nowhere = call(
        operator, "PUT", f"/v1/specimens/no-{tag}/{train_spec}/role", json={"role": "test"}
    )
    assert nowhere.status_code == 404 and nowhere.json()["field"] == "lab"
    assert call(rev_token, "PUT", path, json={"role": "test"}).status_code == 403
    refused = call(operator, "PUT", path, json={"role": "excluded"})
    assert refused.status_code == 409 and refused.json()["field"] == "role"
    assert "1 training label" in refused.json()["error"] and "force" in refused.json()["error"]

    op = _client_env(stack, operator, tmp_path)
    forced = json.loads(
        _ok(bmcell(op, "specimens", "set-role", lab, train_spec, "excluded", "--force", "--json"))
    )
    assert forced["specimen"]["role"] == "excluded" and forced["changed"]
    assert forced["invalidated"] == {
        "training_labels": 1,
        "validation_labels": 0,
        "test_labels": 0,
        "model_versions": [7],
        "labels_withdrawn": 1,
        "open_tasks_cancelled": 1,
    }
    # Its cells are out of everything: no label, no new task.
    assert call(operator, "GET", f"/v1/cells/{labelled}").json()["label"] is None
    skipped = call(operator, "POST", "/v1/tasks", json={"kind": "initial", "cell_ids": free[:1]})
    assert skipped.json() == {"created": [], "skipped_cells": free[:1]}
    roles = call(up_token, "GET", f"/v1/specimens?lab={lab}&role=excluded").json()["specimens"]
    assert [s["code"] for s in roles] == [train_spec]

    # Every change names its actor.
    with db.connection() as conn:
        rows = conn.execute(
            """SELECT action, entity_id, actor_kind, actor_name, before, after, detail
                 FROM audit_log
                WHERE (entity = 'lab' AND entity_id = %s) OR (entity = 'user' AND entity_id = ANY(%s))
                   OR (entity = 'specimen' AND entity_id LIKE %s) ORDER BY id""",
            (lab, [uploader, reviewer], f"{lab}/%"),
        ).fetchall()
    people = [(r["action"], r["actor_name"]) for r in rows if r["action"] != "specimen.set_role"]
    assert sorted(people) == sorted(
        [("lab.add", accounts.ADMIN)]
        + [("user.add", accounts.ADMIN), ("token.issue", accounts.ADMIN)] * 2
        + [("specimen.add", uploader)] * 2  # each specimen's first upload
    )
    added = {r["entity_id"]: r["after"]["role"] for r in rows if r["action"] == "specimen.add"}
    assert added == {f"{lab}/{test_spec}": "test", f"{lab}/{train_spec}": "training"}
    (change,) = [r for r in rows if r["action"] == "specimen.set_role"]
    assert change["actor_name"] == accounts.OPERATOR and change["actor_kind"] == "person"
    assert change["before"] == {"role": "training"} and change["after"] == {"role": "excluded"}
    assert change["detail"]["force"] is True
    assert change["detail"]["invalidated"] == forced["invalidated"]
