"""Labeling API against the embedded stack: identity, authorization, the queue's rules,
bad input, labels, exports, metrics and the ``bmcell users`` CLI.

Test data goes in with SQL (labs, specimens, field images, cells, rounds, review
tasks) and small PNG crops go into the data bucket; every test makes its own labs,
so tests do not see each other's tasks.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import psycopg
import pytest
from PIL import Image
from psycopg.rows import dict_row

from bmcell import tls
from bmcell import users as user_repo
from bmcell.settings import Settings, load
from bmcell.stack import Stack
from bmcell.stack.components import labelapi_url
from bmcell.storage import ObjectStore

pytestmark = pytest.mark.integration

COLOURS = [(200, 60, 90), (90, 60, 200), (60, 180, 90), (230, 200, 80)]


def png(colour: tuple[int, int, int], size: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Seeder:
    """Writes test rows straight into Postgres and crops into object storage."""

    conn: psycopg.Connection
    store: ObjectStore
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def lab(self, name: str) -> tuple[int, str]:
        code = f"{name}-{self.tag}"
        lab_id = self.conn.execute(
            "INSERT INTO labs (code) VALUES (%s) RETURNING id", (code,)
        ).fetchone()["id"]
        return lab_id, code

    def cells(self, lab_id: int, n: int, *, is_test: bool = False) -> list[int]:
        specimen = self.conn.execute(
            "INSERT INTO specimens (lab_id, code, role) VALUES (%s, %s, %s) RETURNING id",
            (lab_id, f"s-{uuid.uuid4().hex[:8]}", "test" if is_test else "training"),
        ).fetchone()["id"]
        field_id = self.conn.execute(
            """INSERT INTO field_images (specimen_id, sha256, object_key, format, width, height,
                                         size_bytes)
               VALUES (%s, %s, 'fields/none.png', 'PNG', 2048, 2048, 1) RETURNING id""",
            (specimen, uuid.uuid4().hex + uuid.uuid4().hex),
        ).fetchone()["id"]
        keys = []
        for i, colour in enumerate(COLOURS):
            key = f"cells/test-labelapi/{self.tag}/{i}.png"
            self.store.put(key, png(colour), "image/png")
            keys.append(key)
        rows = self.conn.execute(
            """INSERT INTO cells (field_id, specimen_id, lab_id, index_in_field, x0, y0, x1, y1,
                                  crop_key, mask_key, cell_area, nucleus_area,
                                  nucleus_cell_ratio, nucleus_axis_ratio, nucleus_width_ratio,
                                  touches_border)
               SELECT %(field)s, %(specimen)s, %(lab)s, i, 10, 10, 60, 60,
                      (%(keys)s::text[])[1 + i %% 4], 'masks/none.png', 2000 + i, 900,
                      0.45, 1.3, 0.6, false
                 FROM generate_series(0, %(n)s - 1) AS i
               RETURNING id""",
            {"field": field_id, "specimen": specimen, "lab": lab_id, "keys": keys, "n": n},
        ).fetchall()
        return sorted(r["id"] for r in rows)

    def round(self, number: int = 3, strategy: str = "cst+al") -> int:
        return self.conn.execute(
            """INSERT INTO rounds (experiment, number, strategy, state)
               VALUES (%s, %s, %s, 'reviewing') RETURNING id""",
            (f"labelapi-{self.tag}", number, strategy),
        ).fetchone()["id"]

    def tasks(
        self, cell_ids: list[int], *, kind: str, round_id: int | None, required_reviews: int = 1
    ) -> list[int]:
        """CST tasks suggest MB; AL tasks offer PMC vs MB; bootstrap kinds suggest nothing."""
        suggested = "MB" if kind == "cst" else None
        top = ["PMC", "MB"] if kind == "al" else []
        probs = [0.48, 0.41] if kind == "al" else []
        rows = self.conn.execute(
            """WITH pool AS (UPDATE cells SET status = 'pending' WHERE id = ANY(%s) RETURNING id)
               INSERT INTO review_tasks (round_id, cell_id, kind, suggested_class, top_classes,
                                         top_probabilities, required_reviews)
               SELECT %s, id, %s, %s, %s, %s, %s FROM pool ORDER BY id RETURNING id""",
            (cell_ids, round_id, kind, suggested, top, probs, required_reviews),
        ).fetchall()
        return sorted(r["id"] for r in rows)

    def user(self, name: str, role: str, labs: list[str], *, expires_days: float | None = None):
        uname = f"{name}-{self.tag}"
        user_repo.add_user(self.conn, uname, role, labs)
        return uname, user_repo.issue_token(self.conn, uname, expires_days).token


@pytest.fixture(scope="module")
def api_url(stack: Stack) -> str:
    return labelapi_url(stack.config)


@pytest.fixture(scope="module")
def store(stack_env: dict[str, str]) -> ObjectStore:
    return ObjectStore(load(Settings)).ensure_buckets()


@pytest.fixture
def db(stack_env: dict[str, str]) -> Iterator[psycopg.Connection]:
    with psycopg.connect(
        stack_env["BMCELL_DATABASE_URL"], autocommit=True, row_factory=dict_row
    ) as conn:
        yield conn


@pytest.fixture
def seed(db: psycopg.Connection, store: ObjectStore) -> Seeder:
    return Seeder(db, store)


def client(url: str, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, headers=headers, timeout=30, verify=tls.httpx_verify())


# --- identity --------------------------------------------------------------------


def test_tokens_expire_revoke_and_name_the_problem(seed: Seeder, api_url: str) -> None:
    _, lab = seed.lab("id")
    name, token = seed.user("ana", "reviewer", [lab])
    with client(api_url, token) as c:
        me = c.get("/v1/me").json()
    assert me == {"name": name, "role": "reviewer", "labs": [lab]}
    # Only the hash is stored.
    stored = seed.conn.execute(
        "SELECT token_hash, prefix FROM api_tokens t JOIN users u ON u.id = t.user_id "
        "WHERE u.name = %s",
        (name,),
    ).fetchone()
    assert token.encode() not in bytes(stored["token_hash"]) and token.startswith(stored["prefix"])

    for headers, problem in [
        ({}, "missing or malformed Authorization"),
        ({"Authorization": "Basic abc"}, "missing or malformed Authorization"),
        ({"Authorization": "Bearer bmc_nope"}, "token is not known"),
    ]:
        resp = httpx.get(f"{api_url}/v1/me", headers=headers, verify=tls.httpx_verify())
        assert resp.status_code == 401 and problem in resp.json()["error"], resp.text

    brief, short = seed.user("brief", "reviewer", [lab], expires_days=0.0001)
    seed.conn.execute(
        "UPDATE api_tokens SET expires_at = now() - interval '1 s' "
        "WHERE user_id = (SELECT id FROM users WHERE name = %s)",
        (brief,),
    )
    with client(api_url, short) as c:
        resp = c.get("/v1/me")
    assert resp.status_code == 401 and "expired" in resp.json()["error"]

    user_repo.revoke(seed.conn, name=name, token_prefix=None)
    with client(api_url, token) as c:
        resp = c.get("/v1/me")
    assert resp.status_code == 401 and "revoked" in resp.json()["error"]


def test_users_cli_adds_issues_and_revokes(
    seed: Seeder, api_url: str, stack_env, stack: Stack
) -> None:
    _, lab = seed.lab("cli")
    # add and token go through the labeling API, as an admin; revoke is server-side.
    env = {**os.environ, **stack_env, "BMCELL_TOKEN": stack.admin_token()}

    def bmcell(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "bmcell.cli.main", "users", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    name = f"cli-{seed.tag}"
    assert bmcell("add", name, "--role", "reviewer", "--lab", lab).returncode == 0
    dup = bmcell("add", name, "--role", "reviewer", "--lab", lab)
    assert dup.returncode == 1 and "already exists" in dup.stderr
    bad_lab = bmcell("add", f"x-{seed.tag}", "--role", "reviewer", "--lab", "no-such-lab")
    assert bad_lab.returncode == 1 and "'no-such-lab' does not exist" in bad_lab.stderr
    out = bmcell("token", name, "--expires-days", "30")
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert token.startswith("bmc_") and "\n" not in token
    with client(api_url, token) as c:
        assert c.get("/v1/me").json()["name"] == name
        prefix = token[:12]
        revoked = bmcell("revoke", "--token-prefix", prefix)
        assert revoked.returncode == 0 and "revoked 1" in revoked.stderr, revoked.stderr
        assert c.get("/v1/me").status_code == 401
    assert bmcell("revoke", name).returncode == 1  # nothing live is left


# --- authorization ---------------------------------------------------------------


@pytest.fixture
def two_labs(seed: Seeder) -> dict:
    """Lab A with a CST task, a labelled cell and a cell in the pool; lab B empty but real."""
    lab_a, code_a = seed.lab("a")
    _, code_b = seed.lab("b")
    cells = seed.cells(lab_a, 3)
    rnd = seed.round()
    task = seed.tasks(cells[:1], kind="cst", round_id=rnd)[0]
    seed.conn.execute(
        "INSERT INTO labels (cell_id, class_code, source, round_added) VALUES (%s, 'LY', 'cst', 1)",
        (cells[1],),
    )
    seed.conn.execute("UPDATE cells SET status = 'labelled' WHERE id = %s", (cells[1],))
    tokens = {
        "uploader_a": seed.user("up", "uploader", [code_a])[1],
        "reviewer_a": seed.user("ra", "reviewer", [code_a])[1],
        "reviewer_b": seed.user("rb", "reviewer", [code_b])[1],
        "operator": seed.user("op", "operator", [])[1],
        "admin": seed.user("ad", "admin", [])[1],
    }
    return {"lab": code_a, "task": task, "labelled": cells[1], "pool": cells[2], "tokens": tokens}


ROLES = ["uploader_a", "reviewer_a", "reviewer_b", "operator", "admin"]
STALE = {"lease_token": str(uuid.UUID(int=7))}
# endpoint -> expected status per caller, in ROLES order.
MATRIX = {
    ("GET", "/v1/me"): [200, 200, 200, 200, 200],
    ("GET", "/v1/taxonomy"): [200, 200, 200, 200, 200],
    ("GET", "/v1/rounds/current/progress"): [200, 200, 200, 200, 200],
    ("POST", "/v1/tasks/next?lab={lab}"): [403, 200, 404, 403, 200],
    ("GET", "/v1/tasks/{task}"): [403, 200, 404, 200, 200],
    ("POST", "/v1/tasks/{task}/submit"): [403, 409, 404, 403, 409],
    ("POST", "/v1/tasks/{task}/release"): [403, 409, 404, 403, 409],
    ("GET", "/v1/cells/{labelled}"): [200, 200, 404, 200, 200],
    ("GET", "/v1/cells/{labelled}/image"): [200, 200, 404, 200, 200],
    ("PUT", "/v1/cells/{labelled}/label"): [403, 200, 404, 403, 200],
    ("GET", "/v1/labels/export?lab={lab}"): [403, 200, 404, 200, 200],
    ("POST", "/v1/tasks"): [403, 403, 403, 201, 201],
}
BODIES = {
    "/v1/tasks/{task}/submit": {**STALE, "answer": "confirm"},
    "/v1/tasks/{task}/release": STALE,
    "/v1/cells/{labelled}/label": {"class_code": "LY"},
    # An already-labelled cell: creating is allowed but skips it, so nothing changes.
    "/v1/tasks": {"kind": "test", "cell_ids": ["{labelled}"], "required_reviews": 2},
}


def test_authorization_matrix(two_labs: dict, api_url: str, db: psycopg.Connection) -> None:
    fmt = {k: two_labs[k] for k in ("lab", "task", "labelled")}
    failures = []
    for (method, path), expected in MATRIX.items():
        body = BODIES.get(path.split("?")[0])
        if body and "cell_ids" in body:
            body = {**body, "cell_ids": [two_labs["labelled"]]}
        for role, want in zip(ROLES, expected, strict=True):
            with client(api_url, two_labs["tokens"][role]) as c:
                resp = c.request(method, path.format(**fmt), json=body)
                if method == "POST" and "next" in path and resp.status_code == 200:
                    lease = resp.json()
                    assert lease["task_id"] == two_labs["task"]
                    back = c.post(
                        f"/v1/tasks/{lease['task_id']}/release",
                        json={"lease_token": lease["lease_token"]},
                    )
                    assert back.status_code == 200, back.text
            if resp.status_code != want:
                failures.append(f"{role} {method} {path}: {resp.status_code} != {want} {resp.text}")
            elif want == 404:
                # A lab B reviewer learns nothing about lab A's objects.
                assert "does not exist" in resp.json()["error"]
    assert not failures, "\n".join(failures)
    # Nothing in lab A changed: the task is open again, the label as it was.
    assert db.execute(
        "SELECT state FROM review_tasks WHERE id = %s", (two_labs["task"],)
    ).fetchone() == {"state": "open"}
    assert db.execute(
        "SELECT class_code FROM labels WHERE cell_id = %s", (two_labs["labelled"],)
    ).fetchone() == {"class_code": "LY"}
    assert (
        db.execute(
            "SELECT count(*) AS n FROM reviews r WHERE task_id = %s", (two_labs["task"],)
        ).fetchone()["n"]
        == 0
    )


def test_scoped_views_hide_other_labs(two_labs: dict, api_url: str) -> None:
    with client(api_url, two_labs["tokens"]["reviewer_b"]) as c:
        assert c.post("/v1/tasks/next").status_code == 204
        assert c.get("/v1/rounds/current/progress").json()["total"] == 0
        assert c.get("/v1/labels/export?format=json").json()["count"] == 0
    with client(api_url, two_labs["tokens"]["reviewer_a"]) as c:
        progress = c.get("/v1/rounds/current/progress").json()
        assert progress["total"] == 1 and progress["by_kind"]["cst"]["open"] == 1
        exported = c.get("/v1/labels/export?format=json").json()
        assert [r["cell_id"] for r in exported["labels"]] == [two_labs["labelled"]]


# --- the queue's rules and bad input ----------------------------------------------


@pytest.fixture
def reviewer_lab(seed: Seeder) -> dict:
    lab_id, code = seed.lab("q")
    cells = seed.cells(lab_id, 4)
    rnd = seed.round(number=4)
    cst = seed.tasks(cells[:2], kind="cst", round_id=rnd)
    al = seed.tasks(cells[2:3], kind="al", round_id=rnd)
    initial = seed.tasks(cells[3:], kind="initial", round_id=None)
    _, token = seed.user("rev", "reviewer", [code])
    return {"lab": code, "cells": cells, "cst": cst, "al": al, "initial": initial, "token": token}


def test_lease_submit_idempotent_and_audited(
    reviewer_lab: dict, api_url: str, db: psycopg.Connection
) -> None:
    with client(api_url, reviewer_lab["token"]) as c:
        task = c.post("/v1/tasks/next").json()
        assert task["task_id"] == reviewer_lab["cst"][0]
        assert task["kind"] == "cst" and task["suggested_class"] == "MB"
        assert set(task["cell"]["morphometrics"]) >= {"cell_area", "nucleus_cell_ratio"}
        # Asking again while holding a live lease resumes the same task.
        assert c.post("/v1/tasks/next").json()["lease_token"] == task["lease_token"]
        image = c.get(task["image_url"])
        assert image.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(image.content)).size == (48, 48)

        body = {"lease_token": task["lease_token"], "answer": "confirm"}
        first = c.post(f"/v1/tasks/{task['task_id']}/submit", json=body).json()
        again = c.post(f"/v1/tasks/{task['task_id']}/submit", json=body).json()
        assert first["status"] == again["status"] == "labelled"
        assert first["class_code"] == again["class_code"] == "MB"
        assert (first["replayed"], again["replayed"]) == (False, True)

        al = c.post("/v1/tasks/next").json()
        assert al["task_id"] != task["task_id"]  # the first CST task is done
    cell = reviewer_lab["cells"][0]
    assert (
        db.execute(
            "SELECT count(*) AS n FROM reviews WHERE task_id = %s", (task["task_id"],)
        ).fetchone()["n"]
        == 1
    )
    label = db.execute("SELECT * FROM labels WHERE cell_id = %s", (cell,)).fetchone()
    assert (label["class_code"], label["source"], label["round_added"]) == ("MB", "cst", 4)
    assert (
        db.execute("SELECT status FROM cells WHERE id = %s", (cell,)).fetchone()["status"]
        == "labelled"
    )
    audit = db.execute(
        "SELECT action, before, after FROM audit_log WHERE entity = 'cell' AND entity_id = %s",
        (str(cell),),
    ).fetchall()
    assert (
        len(audit) == 1 and audit[0]["before"] is None and audit[0]["after"]["class_code"] == "MB"
    )


def test_page_of_cst_tasks_shares_a_class_and_a_skip_moves_on(
    seed: Seeder, api_url: str, db: psycopg.Connection
) -> None:
    """The reviewer's gallery: a page of leases sharing one suggested class, held leases
    first when asked again, one submit per task; a skip goes to a colleague."""
    lab_id, code = seed.lab("page")
    rnd = seed.round()
    tasks = seed.tasks(seed.cells(lab_id, 6), kind="cst", round_id=rnd)
    db.execute("UPDATE review_tasks SET suggested_class = 'LY' WHERE id = ANY(%s)", (tasks[1::2],))
    seed.tasks(seed.cells(lab_id, 1), kind="al", round_id=rnd)
    _, token = seed.user("pg", "reviewer", [code])
    _, colleague = seed.user("pg2", "reviewer", [code])
    ids = lambda page: [t["task_id"] for t in page["tasks"]]  # noqa: E731
    with client(api_url, token) as c:
        page = c.post(f"/v1/tasks/page?kind=cst&lab={code}&size=2").json()
        assert page["suggested_class"] == "MB" and ids(page) == [tasks[0], tasks[2]]
        again = c.post(f"/v1/tasks/page?kind=cst&lab={code}&size=3").json()
        assert ids(again) == [tasks[0], tasks[2], tasks[4]]
        assert [t["lease_token"] for t in again["tasks"][:2]] == [
            t["lease_token"] for t in page["tasks"]
        ]
        ly = c.post(f"/v1/tasks/page?kind=cst&lab={code}&suggested=LY").json()
        assert ly["suggested_class"] == "LY" and ids(ly) == tasks[1::2]
        bad = c.post("/v1/tasks/page?suggested=XX")
        assert bad.status_code == 400 and bad.json()["field"] == "suggested"
        assert c.post("/v1/tasks/page?size=49").json()["field"] == "size"
        for t in again["tasks"]:
            out = c.post(
                f"/v1/tasks/{t['task_id']}/submit",
                json={"lease_token": t["lease_token"], "answer": "confirm"},
            ).json()
            assert out["status"] == "labelled" and out["class_code"] == "MB"
        skipped = ly["tasks"][0]
        resp = c.post(
            f"/v1/tasks/{skipped['task_id']}/release",
            json={"lease_token": skipped["lease_token"]},
        )
        assert resp.status_code == 200
        # The skipper's page goes on without it; a colleague is given it.
        assert ids(c.post(f"/v1/tasks/page?kind=cst&lab={code}&size=3").json()) == tasks[3::2]
    with client(api_url, colleague) as c:
        assert c.post(f"/v1/tasks/next?kind=cst&lab={code}").json()["task_id"] == tasks[1]
    assert db.execute(
        "SELECT count(*) AS n FROM audit_log WHERE action = 'review.skip' AND entity_id = %s",
        (str(tasks[1]),),
    ).fetchone() == {"n": 1}


def test_bad_input_is_refused_precisely_and_changes_nothing(
    reviewer_lab: dict, api_url: str, db: psycopg.Connection
) -> None:
    with client(api_url, reviewer_lab["token"]) as c:
        task = c.post("/v1/tasks/next").json()
        tid, lease = task["task_id"], task["lease_token"]
        url = f"/v1/tasks/{tid}/submit"
        cases = [
            (
                {"lease_token": lease, "answer": "correct", "class_code": "XYZ"},
                400,
                "class_code",
                "'XYZ'",
            ),
            ({"lease_token": lease, "answer": "correct"}, 400, "class_code", "None"),
            (
                {"lease_token": lease, "answer": "difficult", "class_code": "MB"},
                400,
                "class_code",
                "empty",
            ),
            (
                {"lease_token": lease, "answer": "confirm", "class_code": "LY"},
                400,
                "class_code",
                "'correct'",
            ),
            ({"lease_token": lease, "answer": "maybe"}, 422, "answer", ""),
            ({"lease_token": "not-a-uuid", "answer": "confirm"}, 422, "lease_token", ""),
            ({"answer": "confirm"}, 422, "lease_token", ""),
            ({"lease_token": lease, "answer": "confirm", "extra": 1}, 422, "extra", ""),
            ({**STALE, "answer": "confirm"}, 409, "lease_token", "no longer held"),
        ]
        for body, status, fld, words in cases:
            resp = c.post(url, json=body)
            assert resp.status_code == status, (body, resp.text)
            assert resp.json()["field"] == fld, (body, resp.text)
            assert words in resp.json()["error"], (body, resp.text)
        resp = c.post(url, content=b"{not json", headers={"Content-Type": "application/json"})
        assert resp.status_code == 422
        assert (
            c.post("/v1/tasks/999999999/submit", json={**STALE, "answer": "confirm"}).status_code
            == 404
        )
        with client(api_url, "bmc_wrong") as bad:
            assert (
                bad.post(url, json={"lease_token": lease, "answer": "confirm"}).status_code == 401
            )
        # Other endpoints name their bad parameter too.
        labelled = reviewer_lab["cells"][0]
        resp = c.put(f"/v1/cells/{labelled}/label", json={"class_code": "NOPE"})
        assert resp.status_code == 400 and resp.json()["field"] == "class_code"
        resp = c.get("/v1/labels/export?class=NOPE")
        assert resp.status_code == 400 and resp.json()["field"] == "class"
        assert c.get("/v1/labels/export?format=xml").status_code == 422
        assert c.post("/v1/tasks/next?kind=bogus").status_code == 422
        assert c.post("/v1/tasks/next?kind=adjudication").status_code == 400
        # Nothing changed: still leased to us, no review, and the lease still works.
        assert (
            db.execute("SELECT count(*) AS n FROM reviews WHERE task_id = %s", (tid,)).fetchone()[
                "n"
            ]
            == 0
        )
        state = db.execute(
            "SELECT state, lease_token FROM review_tasks WHERE id = %s", (tid,)
        ).fetchone()
        assert state["state"] == "leased" and str(state["lease_token"]) == lease
        # Released: the old lease is stale afterwards.
        assert c.post(f"/v1/tasks/{tid}/release", json={"lease_token": lease}).status_code == 200
        resp = c.post(url, json={"lease_token": lease, "answer": "confirm"})
        assert resp.status_code == 409 and f"task {tid} is open" in resp.json()["error"]


def test_al_confirm_takes_top_class_and_initial_needs_a_class(
    reviewer_lab: dict, api_url: str, db: psycopg.Connection
) -> None:
    with client(api_url, reviewer_lab["token"]) as c:
        for _ in reviewer_lab["cst"]:
            t = c.post("/v1/tasks/next?kind=cst").json()
            c.post(
                f"/v1/tasks/{t['task_id']}/submit",
                json={"lease_token": t["lease_token"], "answer": "difficult"},
            )
        al = c.post("/v1/tasks/next?kind=al").json()
        assert [t["class_code"] for t in al["top"]] == ["PMC", "MB"]
        out = c.post(
            f"/v1/tasks/{al['task_id']}/submit",
            json={"lease_token": al["lease_token"], "answer": "confirm"},
        ).json()
        assert out["status"] == "labelled" and out["class_code"] == "PMC"
        init = c.post("/v1/tasks/next").json()
        assert init["kind"] == "initial"
        resp = c.post(
            f"/v1/tasks/{init['task_id']}/submit",
            json={"lease_token": init["lease_token"], "answer": "confirm"},
        )
        assert resp.status_code == 400 and resp.json()["field"] == "answer"
    statuses = db.execute(
        "SELECT status FROM cells WHERE id = ANY(%s) ORDER BY id", (reviewer_lab["cells"][:2],)
    ).fetchall()
    assert [s["status"] for s in statuses] == ["difficult", "difficult"]
    assert (
        db.execute(
            "SELECT count(*) AS n FROM labels WHERE cell_id = ANY(%s)", (reviewer_lab["cells"][:2],)
        ).fetchone()["n"]
        == 0
    )


def test_k_reviews_agreement_difficult_and_adjudication(
    seed: Seeder, api_url: str, db: psycopg.Connection
) -> None:
    lab_id, code = seed.lab("k")
    cells = seed.cells(lab_id, 3, is_test=True)
    _, op = seed.user("op", "operator", [])
    _, admin = seed.user("adm", "admin", [])
    reviewers = [seed.user(f"r{i}", "reviewer", [code])[1] for i in range(2)]
    with client(api_url, op) as c:
        created = c.post(
            "/v1/tasks", json={"kind": "test", "cell_ids": cells, "required_reviews": 2}
        )
        assert created.status_code == 201, created.text
        tasks = created.json()["created"]
        assert len(tasks) == 3
        again = c.post("/v1/tasks", json={"kind": "test", "cell_ids": cells}).json()
        assert again == {"created": [], "skipped_cells": cells}
    # Reviewer 0 answers: agree LY, LY vs MO, difficult both.
    plans = [["LY", "LY"], ["LY", "MO"], [None, None]]
    outcomes = {}
    for who, token in enumerate(reviewers):
        with client(api_url, token) as c:
            for _ in tasks:
                t = c.post(f"/v1/tasks/next?lab={code}").json()
                idx = tasks.index(t["task_id"])
                cls = plans[idx][who]
                body = {
                    "lease_token": t["lease_token"],
                    "answer": "correct" if cls else "difficult",
                }
                if cls:
                    body["class_code"] = cls
                outcomes[(who, idx)] = c.post(f"/v1/tasks/{t['task_id']}/submit", json=body).json()
            # Never the same task twice: nothing is left for this reviewer.
            assert c.post("/v1/tasks/next").status_code == 204
    assert {outcomes[(0, i)]["status"] for i in range(3)} == {"recorded"}
    assert [outcomes[(1, i)]["status"] for i in range(3)] == [
        "labelled",
        "adjudication",
        "difficult",
    ]
    label = db.execute(
        "SELECT class_code, source FROM labels WHERE cell_id = %s", (cells[0],)
    ).fetchone()
    assert label == {"class_code": "LY", "source": "test"}
    assert (
        db.execute("SELECT status FROM cells WHERE id = %s", (cells[2],)).fetchone()["status"]
        == "difficult"
    )

    adj_id = outcomes[(1, 1)]["adjudication_task_id"]
    with client(api_url, reviewers[0]) as c:
        assert c.post(f"/v1/tasks/next?lab={code}").status_code == 204  # admins only
    with client(api_url, admin) as c:
        adj = c.post(f"/v1/tasks/next?kind=adjudication&lab={code}").json()
        assert adj["task_id"] == adj_id
        assert [t["class_code"] for t in adj["top"]] == ["LY", "MO"]
        out = c.post(
            f"/v1/tasks/{adj_id}/submit",
            json={"lease_token": adj["lease_token"], "answer": "correct", "class_code": "MO"},
        ).json()
        assert out["status"] == "labelled"
        # The admin corrects the agreed label; it is audited and used from the next round.
        corrected = c.put(
            f"/v1/cells/{cells[0]}/label", json={"class_code": "PC", "note": "nucleoli"}
        )
        assert corrected.status_code == 200, corrected.text
        cell = c.get(f"/v1/cells/{cells[0]}").json()
    assert db.execute(
        "SELECT class_code, source FROM labels WHERE cell_id = %s", (cells[1],)
    ).fetchone() == {"class_code": "MO", "source": "test"}
    assert cell["label"]["class_code"] == "PC"
    assert [h["action"] for h in cell["history"]] == ["label.review", "label.correct"]
    assert cell["history"][1]["before"]["class_code"] == "LY"
    assert cell["history"][1]["after"]["note"] == "nucleoli"
    max_round = db.execute("SELECT coalesce(max(number), -1) + 1 AS n FROM rounds").fetchone()["n"]
    assert cell["label"]["round_added"] == max_round


def test_export_and_metrics(reviewer_lab: dict, api_url: str) -> None:
    with client(api_url, reviewer_lab["token"]) as c:
        for _ in range(2):
            t = c.post("/v1/tasks/next?kind=cst").json()
            c.post(
                f"/v1/tasks/{t['task_id']}/submit",
                json={"lease_token": t["lease_token"], "answer": "correct", "class_code": "LY"},
            )
        csv_text = c.get(
            f"/v1/labels/export?format=csv&lab={reviewer_lab['lab']}&round=4&class=LY"
        ).text
        lines = csv_text.strip().splitlines()
        assert lines[0].startswith("cell_id,lab,specimen,is_test,class_code,source,round")
        assert len(lines) == 3 and all(",LY,cst,4," in line for line in lines[1:])
        assert c.get("/v1/labels/export?format=json&round=99").json()["count"] == 0
        assert (
            c.get("/v1/labels/export?format=json&class=MB&lab=" + reviewer_lab["lab"]).json()[
                "count"
            ]
            == 0
        )
    text = httpx.get(f"{api_url}/metrics", verify=tls.httpx_verify()).text
    for series in (
        'bmcell_review_backlog_tasks{kind="al"}',
        'bmcell_labels_recorded_total{cell_class="LY",source="cst_corrected"}',
        'bmcell_http_requests_total{method="POST",route="/v1/tasks/{task_id}/submit",status="200"}',
        'bmcell_labelapi_tasks_leased_total{kind="cst"}',
        'bmcell_labelapi_tasks_submitted_total{answer="correct",kind="cst"}',
        'bmcell_labelapi_review_seconds_bucket{kind="cst",le="1.0"}',
    ):
        assert series in text, series


def test_reviewer_page_and_openapi_are_served(api_url: str) -> None:
    page = httpx.get(f"{api_url}/", verify=tls.httpx_verify())
    assert page.status_code == 200 and "bmcell reviewer" in page.text
    assert httpx.get(f"{api_url}/static/app.js", verify=tls.httpx_verify()).status_code == 200
    paths = httpx.get(f"{api_url}/openapi.json", verify=tls.httpx_verify()).json()["paths"]
    assert {"/v1/tasks/next", "/v1/tasks/{task_id}/submit", "/v1/labels/export"} <= set(paths)


def test_bodies_over_the_limit_are_refused_before_authentication(api_url: str) -> None:
    limit = 1024 * 1024  # BMCELL_MAX_BODY_BYTES' default
    big = b'{"kind": "initial", "cell_ids": [' + b"1," * (limit // 2) + b"1]}"
    # No token at all: the size is refused first, so authentication never read the body.
    resp = httpx.post(
        f"{api_url}/v1/tasks",
        content=big,
        headers={"Content-Type": "application/json"},
        verify=tls.httpx_verify(),
    )
    assert resp.status_code == 413, resp.text
    assert "BMCELL_MAX_BODY_BYTES" in resp.json()["error"]

    def chunked():  # no Content-Length: counted as it streams
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536

    try:
        resp = httpx.post(
            f"{api_url}/v1/tasks",
            content=chunked(),
            headers={"Content-Type": "application/json"},
            verify=tls.httpx_verify(),
        )
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
        pass  # the server answered 413 and closed while the client was still sending
    else:
        assert resp.status_code == 413 and "BMCELL_MAX_BODY_BYTES" in resp.json()["error"]
    # A small body without a token is the usual 401.
    small = httpx.post(
        f"{api_url}/v1/tasks", json={"kind": "initial", "cell_ids": [1]}, verify=tls.httpx_verify()
    )
    assert small.status_code == 401


def test_exports_stream(reviewer_lab: dict, api_url: str) -> None:
    with client(api_url, reviewer_lab["token"]) as c, c.stream("GET", "/v1/labels/export") as r:
        assert r.status_code == 200 and r.headers.get("transfer-encoding") == "chunked"
        assert next(r.iter_lines()).startswith("cell_id,")
