"""Differential count of a specimen through ``bmcell report`` and the labeling API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import httpx
import pytest

from bmcell import modelstore, tls
from bmcell import users as user_repo
from bmcell.db import Database
from bmcell.settings import Settings, load
from bmcell.stack import Stack
from bmcell.stack.components import labelapi_url
from bmcell.taxonomy import DEFAULT_TAXONOMY
from bmcell.v1 import classifier_pb2, classifier_pb2_grpc
from tests.integration.seed import seed_cells, synth_crops
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


def check_report(body: dict, sp: dict, *, unclassified: int) -> None:
    assert body["model"]["version"] == sp["version"]
    assert body["lab"] == sp["lab"] and body["specimen"] == sp["specimen"]
    classified = 34 - unclassified
    assert body["cells"] == {
        "counted": 34,
        "classified": classified,
        "unclassified": unclassified,
        "excluded": 1,
    }
    assert round(sum(body["percentages"].values()), 6) == 100.0
    want: dict[str, int] = {}
    for cid, code in sp["top1"].items():
        if unclassified and cid == sp["cells"][-1]:
            continue
        want[code] = want.get(code, 0) + 1
    got = {c["code"]: c["count"] for c in body["classes"] if c["count"]}
    assert got == want
    tax = DEFAULT_TAXONOMY
    m = sum(want.get(c, 0) for c in tax.myeloid)
    e = sum(want.get(c, 0) for c in tax.erythroid)
    assert (body["myeloid"], body["erythroid"]) == (m, e)
    assert body["me_ratio"] == (None if e == 0 else pytest.approx(m / e, abs=1e-3))
    low = {cid for cid, p in sp["p1"].items() if p < body["min_confidence"]}
    if unclassified:
        low.discard(sp["cells"][-1])
    assert {x["cell_id"] for x in body["low_confidence"]} == low


def test_cli_report_json_text_and_html(specimen, tmp_path) -> None:
    sp = specimen
    res = bmcell("report", "specimen", sp["specimen"], "--format", "json", "--no-predict")
    assert res.returncode == 0, res.stderr
    check_report(json.loads(res.stdout), sp, unclassified=1)
    assert "unclassified" in " ".join(json.loads(res.stdout)["notes"])

    text = bmcell("report", "specimen", sp["specimen"], "--lab", sp["lab"], "--no-predict")
    assert text.returncode == 0 and sp["specimen"] in text.stdout, text.stderr

    # With the classifier's address set, the unpredicted cell is classified first.
    out = tmp_path / "report.html"
    res = bmcell(
        "report",
        "specimen",
        sp["specimen"],
        "--format",
        "html",
        "--out",
        str(out),
        "--per-class",
        "3",
    )
    assert res.returncode == 0, res.stderr
    page = out.read_text()
    res = bmcell("report", "specimen", sp["specimen"], "--format", "json")
    body = json.loads(res.stdout)
    check_report(body, sp | {"top1": body_top1(sp, body)}, unclassified=0)
    for c in body["classes"]:
        if c["count"]:
            assert f'id="class-{c["code"]}"' in page
    assert "data:image/png;base64," in page and "<style>" in page

    missing = bmcell("report", "specimen", "no-such-specimen", "--no-predict")
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def body_top1(sp: dict, body: dict) -> dict[int, str]:
    """Truth for the formerly unpredicted cell: read from the database through the CLI's
    own answer (its class is whatever the model says)."""
    settings = load(Settings)
    db = Database(settings).open()
    try:
        with db.connection() as conn:
            row = conn.execute(
                "SELECT top1, p1 FROM predictions WHERE cell_id = %s AND model_version = %s",
                (sp["cells"][-1], sp["version"]),
            ).fetchone()
    finally:
        db.close()
    assert row is not None, "the CLI should have classified the last cell"
    sp["p1"][sp["cells"][-1]] = row["p1"]
    return {**sp["top1"], sp["cells"][-1]: DEFAULT_TAXONOMY.codes[row["top1"]]}


def test_http_report_scoped_by_lab(specimen, stack: Stack) -> None:
    sp = specimen
    url = labelapi_url(stack.config)
    path = f"/v1/specimens/{sp['lab']}/{sp['specimen']}/report"

    def get(token: str | None, p: str = path, **params) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(
            url + p, headers=headers, params=params, timeout=60, verify=tls.httpx_verify()
        )

    for role in ("reviewer", "uploader"):
        resp = get(sp["tokens"][(role, sp["lab"])])
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert round(sum(body["percentages"].values()), 6) == 100.0
        assert body["cells"]["excluded"] == 1 and body["cells"]["counted"] == 34
        assert "_cells" not in body
    html = get(sp["tokens"][("reviewer", sp["lab"])], format="html", per_class=2)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    for c in body["classes"]:
        if c["count"]:
            assert f'id="class-{c["code"]}"' in html.text
    assert html.text.count("data:image/png;base64,") >= len(
        [c for c in body["classes"] if c["count"]]
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
    assert "/v1/specimens/{lab}/{specimen}/report" in spec_doc["paths"]
