"""Differential count of a specimen through ``bmcell report`` and the labeling API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from html import escape

import httpx
import pytest

from bmcell import modelstore, tls
from bmcell import users as user_repo
from bmcell.stack import Stack
from bmcell.stack.components import labelapi_url
from bmcell.taxonomy import DEFAULT_TAXONOMY
from bmcell.v1 import classifier_pb2, classifier_pb2_grpc
from tests.integration.seed import retire_active_model, seed_cells, synth_crops
from tests.integration.test_classifier import INPUT, peaky_model

pytestmark = pytest.mark.integration


def bmcell(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bmcell.cli.main", *args],
        env=env or dict(os.environ),
        capture_output=True,
        text=True,
        timeout=360,
    )


@pytest.fixture(scope="module")
def specimen(rt, stack: Stack, operator_channel) -> dict:
    """34 cells of one specimen, a border cell, and one cell left without a prediction."""
    settings, db, store = rt
    version = modelstore.register_version(
        db,
        store,
        peaky_model(31),
        DEFAULT_TAXONOMY,
        INPUT,
        model_name=settings.model_name,
        note="report test",
    )
    tag = uuid.uuid4().hex[:6]
    lab, spec = f"lab-report-{tag}", f"s-report-{tag}"
    images, _ = synth_crops(35, seed=17)
    cells = seed_cells(db, store, images, lab=lab, specimen=spec)
    with db.transaction() as conn:
        conn.execute(
            "UPDATE cells SET touches_border = true, status = 'excluded' WHERE id = %s",
            (cells[0],),
        )
    with operator_channel(stack.config.addr("classifier")) as ch:
        stub = classifier_pb2_grpc.ClassifierStub(ch)
        stub.ActivateModel(classifier_pb2.ActivateModelRequest(version=version), timeout=300)
        done = list(
            stub.PredictPool(
                classifier_pb2.PredictPoolRequest(cell_ids=cells[:-1], model_version=version),
                timeout=300,
            )
        )
    assert done[-1].finished
    with db.transaction() as conn:
        lab_id = conn.execute("SELECT id FROM labs WHERE code = %s", (lab,)).fetchone()["id"]
        other = f"lab-other-{tag}"
        conn.execute("INSERT INTO labs (code) VALUES (%s)", (other,))
        tokens = {}
        for role, labs in (("reviewer", [lab]), ("uploader", [lab]), ("reviewer", [other])):
            name = f"rep-{role}-{labs[0]}"
            user_repo.add_user(conn, name, role, labs)
            tokens[(role, labs[0])] = user_repo.issue_token(conn, name, 1).token
        preds = conn.execute(
            """SELECT p.cell_id, p.top1, p.p1 FROM predictions p
                WHERE p.cell_id = ANY(%s) AND p.model_version = %s""",
            (cells[1:], version),
        ).fetchall()
    codes = DEFAULT_TAXONOMY.codes
    return {
        "lab": lab,
        "lab_id": lab_id,
        "other": other,
        "specimen": spec,
        "cells": cells,
        "version": version,
        "tokens": tokens,
        "top1": {r["cell_id"]: codes[r["top1"]] for r in preds},
        "p1": {r["cell_id"]: r["p1"] for r in preds},
    }


def check_report(body: dict, sp: dict) -> None:
    """The seeded specimen's report: the cell left without a prediction was predicted
    on demand, so nothing is unclassified, and the counts follow the predictions."""
    assert body["model"]["version"] == sp["version"]
    assert body["lab"] == sp["lab"] and body["specimen"] == sp["specimen"]
    cells = body["cells"]
    assert cells["border"] == 1 and cells["unclassified"] == 0 and cells["reviewed"] == 0
    assert cells["nucleated"] + cells["apart"] == cells["predicted"] == 34
    assert round(sum(body["percentages"].values()), 6) in (0.0, 100.0)
    tax = DEFAULT_TAXONOMY
    got = {c["code"]: c["count"] for c in body["classes"] + body["apart"] if c["count"]}
    known = {cid: code for cid, code in sp["top1"].items() if cid != sp["cells"][-1]}
    for code in set(known.values()):
        assert got.get(code, 0) >= sum(1 for c in known.values() if c == code)
    assert sum(got.values()) == 34
    m = sum(got.get(c, 0) for c in tax.myeloid)
    e = sum(got.get(c, 0) for c in tax.erythroid)
    assert (body["myeloid"], body["erythroid"]) == (m, e)
    assert body["me_ratio"] == (None if e == 0 else pytest.approx(m / e, abs=1e-3))
    low = {cid for cid, p in sp["p1"].items() if p < body["min_confidence"]}
    assert low <= {x["cell_id"] for x in body["low_confidence"]}


def test_http_report_scoped_by_lab(specimen, stack: Stack) -> None:
    sp = specimen
    url = labelapi_url(stack.config)
    path = f"/v1/specimens/{sp['lab']}/{sp['specimen']}/report"

    def get(token: str | None, p: str = path, **params) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(
            url + p, headers=headers, params=params, timeout=120, verify=tls.httpx_verify()
        )

    for role in ("reviewer", "uploader"):
        resp = get(sp["tokens"][(role, sp["lab"])])
        assert resp.status_code == 200, resp.text
        body = resp.json()
        check_report(body, sp)
        assert "_cells" not in body
    html = get(sp["tokens"][("reviewer", sp["lab"])], format="html", per_class=2)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    for c in body["classes"] + body["apart"]:
        if c["count"]:
            assert f'id="class-{c["code"]}"' in html.text
    assert html.text.count("data:image/png;base64,") >= len(
        [c for c in body["classes"] + body["apart"] if c["count"]]
    )
    strict = get(sp["tokens"][("reviewer", sp["lab"])], min_confidence=0.999)
    assert len(strict.json()["low_confidence"]) >= len(body["low_confidence"])

    outsider = get(sp["tokens"][("reviewer", sp["other"])])
    assert outsider.status_code == 404 and "does not exist" in outsider.json()["error"]
    assert get(None).status_code == 401
    unknown = get(sp["tokens"][("reviewer", sp["lab"])], f"/v1/specimens/{sp['lab']}/nope/report")
    assert unknown.status_code == 404 and unknown.json()["field"] == "specimen"
    bad = get(sp["tokens"][("reviewer", sp["lab"])], min_confidence=2)
    assert bad.status_code == 422
    spec_doc = httpx.get(url + "/openapi.json", timeout=30, verify=tls.httpx_verify()).json()
    for route in ("/report", "/predict", "/report/verify"):
        assert f"/v1/specimens/{{lab}}/{{specimen}}{route}" in spec_doc["paths"]


# --- a fresh specimen, uploaded and reported through the public interfaces only -----


@pytest.fixture(scope="module")
def fresh(rt, stack: Stack, operator_channel, tmp_path_factory) -> dict:
    """A lab with an uploader, a reviewer and an outsider; no active model yet."""
    settings, db, _store = rt
    tag = uuid.uuid4().hex[:6]
    lab, other = f"lab-fresh-{tag}", f"lab-away-{tag}"
    tokens = {}
    with db.transaction() as conn:
        # People and labs are set up in the database here (the admin's HTTP routes
        # for them are issue 14's other part); everything after goes through the API.
        for code in (lab, other):
            conn.execute("INSERT INTO labs (code) VALUES (%s)", (code,))
        for role, in_lab in (("uploader", lab), ("reviewer", lab), ("reviewer", other)):
            name = f"fresh-{role}-{in_lab}"
            user_repo.add_user(conn, name, role, [in_lab])
            tokens[(role, in_lab)] = user_repo.issue_token(conn, name, 1).token
        retire_active_model(conn, settings.model_name)  # "no model passed the gate yet"
    return {"lab": lab, "other": other, "tokens": tokens, "tag": tag}


def upload_fields(stack: Stack, fresh: dict, tmp_path) -> str:
    """Two synthetic fields of one new specimen, uploaded by the lab's uploader."""
    from bmcell.grpc_client import bearer
    from bmcell.synth import generate_dataset
    from bmcell.v1 import segmenter_pb2, segmenter_pb2_grpc

    seed = int(uuid.uuid4().int % 10**6)  # fresh bytes: no duplicate of another test's field
    manifest = generate_dataset(tmp_path, labs=1, specimens=1, fields=2, seed=seed, size=512)
    spec = f"s-fresh-{fresh['tag']}"

    def requests(data: bytes, name: str):
        yield segmenter_pb2.UploadRequest(
            header=segmenter_pb2.UploadHeader(lab=fresh["lab"], specimen=spec, filename=name)
        )
        yield segmenter_pb2.UploadRequest(chunk=data)

    token = fresh["tokens"][("uploader", fresh["lab"])]
    with tls.grpc_channel(stack.config.addr("segmenter")) as ch:
        stub = segmenter_pb2_grpc.SegmenterStub(ch)
        for rec in manifest.specimens[0].fields:
            path = tmp_path / rec.image
            stub.Upload(requests(path.read_bytes(), path.name), metadata=bearer(token), timeout=300)
    return spec


def test_fresh_specimen_report_with_only_a_token(
    rt, fresh, stack: Stack, operator_channel, operator_token: str, tmp_path
) -> None:
    settings, db, store = rt
    url = labelapi_url(stack.config)
    lab = fresh["lab"]
    uploader = fresh["tokens"][("uploader", lab)]
    reviewer = fresh["tokens"][("reviewer", lab)]
    spec = upload_fields(stack, fresh, tmp_path)
    base = f"{url}/v1/specimens/{lab}/{spec}"
    client = httpx.Client(timeout=300, verify=tls.httpx_verify())

    def call(method: str, path: str, token: str, headers=None, **kw) -> httpx.Response:
        auth = {"Authorization": f"Bearer {token}", **(headers or {})}
        return client.request(method, base + path, headers=auth, **kw)

    # Before any model passed the gate: a clear 409, not a report of unclassified cells.
    for method, path in (("GET", "/report"), ("POST", "/predict")):
        refused = call(method, path, uploader)
        assert refused.status_code == 409, refused.text
        assert "no model passed the gate yet" in refused.json()["error"]

    version = modelstore.register_version(
        db, store, peaky_model(47), DEFAULT_TAXONOMY, INPUT,
        model_name=settings.model_name, note="fresh report test",
    )  # fmt: skip
    with operator_channel(stack.config.addr("classifier")) as ch:
        stub = classifier_pb2_grpc.ClassifierStub(ch)
        stub.ActivateModel(classifier_pb2.ActivateModelRequest(version=version), timeout=300)

    # Progress while the classifier predicts the specimen's cells on demand.
    with client.stream(
        "POST", base + "/predict", headers={"Authorization": f"Bearer {uploader}"}
    ) as resp:
        assert resp.status_code == 200 and "ndjson" in resp.headers["content-type"]
        lines = [json.loads(line) for line in resp.iter_lines() if line.strip()]
    head, last = lines[0], lines[-1]
    assert head["model_version"] == version and head["to_predict"] > 0
    assert last == {"finished": True, "predicted": head["to_predict"]}
    assert lines[-2]["done"] == lines[-2]["total"] == head["to_predict"]

    body = call("GET", "/report", uploader, params={"format": "json"}).json()
    cells = body["cells"]
    assert cells["unclassified"] == 0 and cells["predicted"] == head["to_predict"]
    assert cells["nucleated"] + cells["apart"] == head["to_predict"]
    assert [c["code"] for c in body["apart"]] == ["BN", "ART"]
    assert not {"BN", "ART"} & set(body["percentages"])
    assert round(sum(body["percentages"].values()), 6) == 100.0
    assert sum(c["count"] for c in body["classes"]) == cells["nucleated"] < 500
    assert any("at least 500" in w for w in body["warnings"])
    assert body["verification"] == {"verified": False, "text": "not verified"}
    # The counts and the printed percentages of lineages and blasts add up.
    by = {c["code"]: c for c in body["classes"]}
    assert body["blasts"]["count"] == by["MB"]["count"]
    assert sum(x["count"] for x in body["lineages"]) == cells["nucleated"]

    # A reviewer's label counts ahead of the prediction: label the first cell BN.
    first = call("GET", "/report", reviewer, params={"format": "json"}).json()
    assert first["digest"] == body["digest"]  # nothing changed between two reads
    operator = {"Authorization": f"Bearer {operator_token}"}
    from bmcell.grpc_client import bearer
    from bmcell.v1 import segmenter_pb2, segmenter_pb2_grpc

    with tls.grpc_channel(stack.config.addr("segmenter")) as ch:
        listed = segmenter_pb2_grpc.SegmenterStub(ch).ListCells(
            segmenter_pb2.ListCellsRequest(lab=lab, specimen=spec),
            metadata=bearer(uploader),
            timeout=60,
        )
    cell_ids = [c.cell_id for c in listed.cells if c.status != "excluded"]
    assert len(cell_ids) == head["to_predict"]
    target = min(cell_ids)
    made = client.post(
        f"{url}/v1/tasks", headers=operator,
        json={"kind": "initial", "cell_ids": [target], "required_reviews": 1},
    )  # fmt: skip
    assert made.status_code == 201, made.text
    task = client.post(
        f"{url}/v1/tasks/next", headers={"Authorization": f"Bearer {reviewer}"},
        params={"kind": "initial", "lab": lab},
    ).json()  # fmt: skip
    assert task["cell"]["id"] == target
    done = client.post(
        f"{url}/v1/tasks/{task['task_id']}/submit",
        headers={"Authorization": f"Bearer {reviewer}"},
        json={"lease_token": task["lease_token"], "answer": "correct", "class_code": "BN"},
    )  # fmt: skip
    assert done.status_code == 200 and done.json()["status"] == "labelled", done.text

    after = call("GET", "/report", uploader).json()  # JSON by default
    bn = {c["code"]: c for c in after["apart"]}["BN"]
    assert bn["reviewed"] == 1 and after["cells"]["reviewed"] == 1
    assert after["cells"]["predicted"] == head["to_predict"] - 1
    assert after["digest"] != body["digest"]

    # Sign-off: a reviewer may, an uploader may not, an outsider sees nothing.
    assert call("POST", "/report/verify", uploader).status_code == 403
    outsider = fresh["tokens"][("reviewer", fresh["other"])]
    assert call("POST", "/report/verify", outsider).status_code == 404
    assert call("GET", "/report", outsider).status_code == 404
    assert call("POST", "/predict", outsider).status_code == 404
    stale_read = call("POST", "/report/verify", reviewer, json={"digest": body["digest"]})
    assert stale_read.status_code == 409 and stale_read.json()["field"] == "digest"
    signed = call("POST", "/report/verify", reviewer, json={"digest": after["digest"]})
    assert signed.status_code == 201, signed.text
    who = f"fresh-reviewer-{lab}"
    assert signed.json()["verified_by"] == who

    report = call("GET", "/report", uploader).json()
    v = report["verification"]
    assert v["verified"] and v["by"] == who and not v["stale"]
    assert v["text"] == f"verified by {who} at {signed.json()['verified_at']}"
    page = call("GET", "/report", uploader, headers={"Accept": "text/html"})
    assert page.headers["content-type"].startswith("text/html")
    assert f"verified by {who}" in page.text and "@page{size:A4" in page.text
    # JSON and HTML carry the same numbers.
    assert f"<b id=nucleated>{report['cells']['nucleated']}</b>" in page.text
    assert f"<b id=blasts>{report['blasts']['percent']:.1f}%</b>" in page.text
    for c in report["classes"]:
        assert (
            f"<td>{c['code']}</td><td>{escape(c['name'])}</td>"
            f"<td class=n>{c['count']}</td><td class=n>{c['reviewed']}</td>"
            f"<td class=n>{c['predicted']}</td><td class=n>{c['percent']:.1f}%</td>"
        ) in page.text
    for c in report["apart"]:
        assert f"<td class=n>{c['count']}</td><td class=n>{c['reviewed']}</td>" in page.text

    # The audit trail names the signer.
    with db.connection() as conn:
        row = conn.execute(
            """SELECT actor_name, after FROM audit_log WHERE action = 'report.verify'
                ORDER BY id DESC LIMIT 1"""
        ).fetchone()
    assert row["actor_name"] == who and row["after"]["digest"] == after["digest"]

    # A reviewer's correction since the sign-off makes it stale.
    moved = client.put(
        f"{url}/v1/cells/{target}/label", headers={"Authorization": f"Bearer {reviewer}"},
        json={"class_code": "ART"},
    )  # fmt: skip
    assert moved.status_code == 200, moved.text
    stale = call("GET", "/report", uploader).json()["verification"]
    assert stale["stale"] and "stale" in stale["text"]

    # The CLI with only the API's URL and a token: no database, no object storage.
    # One call (the CLI takes long to start on a busy machine): the old subcommand's
    # name, --api, the token from BMCELL_TOKEN, the HTML page to --out.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            ("BMCELL_DATABASE", "BMCELL_S3", "PG", "BMCELL_STACK", "BMCELL_LABELAPI")
        )
    }
    env |= {"BMCELL_STACK_RUN_DIR": str(tmp_path / "no-stack"), "BMCELL_TOKEN": uploader}
    out = tmp_path / "r.html"
    res = bmcell("report", "specimen", "--api", url, lab, spec, "--out", str(out), env=env)
    assert res.returncode == 0, res.stderr
    assert "0 cell(s) to predict" in res.stderr
    cli_page = out.read_text()
    assert "stale" in cli_page
    assert f"<b id=nucleated>{report['cells']['nucleated']}</b>" in cli_page
