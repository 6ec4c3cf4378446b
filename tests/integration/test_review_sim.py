"""Simulated reviewers answering through the real labeling API (``bmcell.review_sim``).

Cells are seeded straight into Postgres (their fields are not synthetic uploads), so
the truth is the fallback ``{cell_id: class}`` JSON. Each test uses its own lab and
its own reviewer names, and leases only in its lab, so other tests' tasks are left
alone.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from PIL import Image

from bmcell import tls
from bmcell.db import Database
from bmcell.review_sim import TruthIndex, simulate_reviews
from bmcell.scenario import segmenter_cells
from bmcell.settings import Settings, load
from bmcell.stack import Stack
from bmcell.stack.components import labelapi_url
from bmcell.storage import ObjectStore
from bmcell.taxonomy import DEFAULT_TAXONOMY
from tests.integration.seed import seed_cells

pytestmark = pytest.mark.integration
CODES = DEFAULT_TAXONOMY.codes


@pytest.fixture(scope="module")
def rt(stack: Stack) -> Iterator[tuple[Database, ObjectStore, str]]:
    settings = load(Settings)
    db = Database(settings).open()
    store = ObjectStore(settings).ensure_buckets()
    yield db, store, labelapi_url(stack.config)
    db.close()


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (i * 37 % 256, i * 91 % 256, 128)).save(buf, format="PNG")
    return buf.getvalue()


def make_tasks(
    db: Database,
    store: ObjectStore,
    n: int,
    *,
    required_reviews: int = 1,
    bootstrap_only: bool = False,
) -> tuple[str, list[int], dict[int, str], dict[int, dict]]:
    """``n`` cells with truth cycling through the classes and one task each.

    Thirds: CST (suggestion right on even cells, a neighbour otherwise), AL (top class
    right or wrong alike), initial labelling (no suggestion). ``bootstrap_only``: all
    initial tasks with ``required_reviews``.
    """
    tag = uuid.uuid4().hex[:6]
    lab = f"lab-sim-{tag}"
    cells = seed_cells(db, store, [_png(i) for i in range(n)], lab=lab)
    truth = {c: CODES[i % len(CODES)] for i, c in enumerate(cells)}
    tasks: dict[int, dict] = {}
    with db.transaction() as conn:
        for i, c in enumerate(cells):
            t = truth[c]
            other = CODES[(CODES.index(t) + 1) % len(CODES)]
            kind = "initial" if bootstrap_only else ("cst", "al", "initial")[i % 3]
            suggested = (t if i % 2 == 0 else other) if kind == "cst" else None
            top = [t, other] if kind == "al" and i % 2 == 0 else [other, t] if kind == "al" else []
            probs = [0.5, 0.4] if top else []
            tid = conn.execute(
                """INSERT INTO review_tasks (cell_id, kind, suggested_class, top_classes,
                                            top_probabilities, required_reviews)
                   VALUES (%s, %s, %s, %s, %s, %s) RETURNING id""",
                (c, kind, suggested, top, probs, required_reviews),
            ).fetchone()["id"]
            conn.execute("UPDATE cells SET status = 'pending' WHERE id = %s", (c,))
            tasks[c] = {
                "id": tid,
                "kind": kind,
                "suggested": suggested or (top[0] if top else None),
            }
    return lab, cells, truth, tasks


def labels_of(db: Database, cells: list[int]) -> tuple[dict[int, str], dict[int, str]]:
    with db.connection() as conn:
        labels = {
            r["cell_id"]: r["class_code"]
            for r in conn.execute(
                "SELECT cell_id, class_code FROM labels WHERE cell_id = ANY(%s)", (cells,)
            )
        }
        status = {
            r["id"]: r["status"]
            for r in conn.execute("SELECT id, status FROM cells WHERE id = ANY(%s)", (cells,))
        }
    return labels, status


def open_tasks(db: Database, cells: list[int]) -> int:
    with db.connection() as conn:
        return conn.execute(
            "SELECT count(*) AS n FROM review_tasks WHERE cell_id = ANY(%s) AND state <> 'done'",
            (cells,),
        ).fetchone()["n"]


@pytest.mark.parametrize("page_size", [1, 5], ids=["one-by-one", "pages"])
def test_error_free_reviewers_label_every_cell_with_its_truth(
    rt, admin_token: str, tmp_path, page_size: int
) -> None:
    """Leasing a task at a time or a page at a time (as the gallery does), every task
    is answered once, from the truth."""
    db, store, url = rt
    lab, cells, truth, tasks = make_tasks(db, store, 51)
    path = tmp_path / "truth.json"
    path.write_text(json.dumps({str(k): v for k, v in truth.items()}))
    index = TruthIndex.load(path)
    prefix = f"sim-{lab}"
    stats = simulate_reviews(
        url,
        admin_token,
        index,
        reviewers=3,
        error_rate=0,
        difficult_rate=0,
        seed=1,
        labs=[lab],
        user_prefix=prefix,
        adjudicate=False,
        page_size=page_size,
    )
    assert stats.stopped == "empty"
    assert stats.reviews == 51 and stats.labelled == 51 and stats.errors_injected == 0
    assert stats.difficult == 0 and stats.unknown_truth == 0 and stats.conflicts == 0
    labels, status = labels_of(db, cells)
    assert labels == truth
    assert set(status.values()) == {"labelled"}
    assert open_tasks(db, cells) == 0
    # confirm exactly where the suggestion (CST) or top class (AL) was right
    want_confirms = sum(1 for c, t in tasks.items() if t["suggested"] == truth[c])
    assert stats.confirms == want_confirms and stats.corrections == 51 - want_confirms
    assert sum(stats.by_reviewer.values()) == 51 and set(stats.by_reviewer) == {
        f"{prefix}-{i}" for i in (1, 2, 3)
    }
    assert stats.by_kind == {"cst": 17, "al": 17, "initial": 17}
    assert stats.tasks_per_s > 0
    # A second run finds nothing to do.
    again = simulate_reviews(
        url,
        admin_token,
        index,
        reviewers=2,
        seed=1,
        labs=[lab],
        user_prefix=prefix,
        adjudicate=False,
    )
    assert again.reviews == 0 and again.stopped == "empty"


def test_error_and_difficult_rates(rt, admin_token: str) -> None:
    db, store, url = rt
    n = 150
    lab, cells, truth, _ = make_tasks(db, store, n)
    stats = simulate_reviews(
        url,
        admin_token,
        TruthIndex.from_mapping(truth),
        reviewers=3,
        error_rate=0.3,
        difficult_rate=0.1,
        seed=5,
        labs=[lab],
        user_prefix=f"sim-{lab}",
        adjudicate=False,
    )
    assert stats.reviews == n
    labels, status = labels_of(db, cells)
    difficult = [c for c, s in status.items() if s == "difficult"]
    assert len(difficult) == stats.difficult and abs(len(difficult) / n - 0.1) < 0.07
    assert len(labels) == n - len(difficult)
    wrong = sum(labels[c] != truth[c] for c in labels)
    assert wrong == stats.errors_injected
    assert abs(wrong / len(labels) - 0.3) < 0.1, (wrong, len(labels))
    # mistakes mostly land on maturation neighbours of the series
    by_answer = {a["cell_id"]: a for a in stats.answers}
    assert all(by_answer[c]["truth"] == truth[c] for c in cells)
    # deterministic given the seed: the same tasks get the same answers
    from bmcell.review_sim import decide

    for a in stats.answers[:20]:
        task = {
            "task_id": a["task_id"],
            "reviews_so_far": 0,
            "suggested_class": a["suggested"],
            "top": [],
        }
        d = decide(task, a["truth"], error_rate=0.3, difficult_rate=0.1, seed=5)
        assert (d.answer == "difficult") == (a["answer"] == "difficult")
        assert d.class_code == a["class_code"]


def test_disagreement_goes_to_the_simulated_adjudicator(rt, admin_token: str) -> None:
    db, store, url = rt
    lab, cells, truth, _ = make_tasks(db, store, 12, required_reviews=3, bootstrap_only=True)
    stats = simulate_reviews(
        url,
        admin_token,
        TruthIndex.from_mapping(truth),
        reviewers=3,
        error_rate=0.5,
        seed=2,
        labs=[lab],
        user_prefix=f"sim-{lab}",
        adjudicator=f"sim-adj-{lab}",
    )
    assert stats.reviews == 12 * 3 + stats.adjudications
    assert stats.adjudications_created > 0 and stats.adjudications == stats.adjudications_created
    assert stats.by_reviewer[f"sim-adj-{lab}"] == stats.adjudications
    assert open_tasks(db, cells) == 0
    labels, status = labels_of(db, cells)
    assert set(status.values()) <= {"labelled", "difficult"} and len(labels) == 12


def test_cli_simulates_from_a_truth_file(rt, admin_token: str, tmp_path) -> None:
    db, store, url = rt
    lab, cells, truth, _ = make_tasks(db, store, 9)
    path = tmp_path / "truth.json"
    path.write_text(json.dumps({str(k): v for k, v in truth.items()}))
    answers = tmp_path / "answers.json"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "bmcell.cli.main",
            "review",
            "--simulate",
            "--truth",
            str(path),
            "--reviewers",
            "2",
            "--lab",
            lab,
            "--no-adjudicate",
            "--json",
            "--answers",
            str(answers),
            "--seed",
            "3",
        ],
        env={**os.environ, "BMCELL_ADMIN_TOKEN": admin_token},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["reviews"] == 9 and out["stopped"] == "empty" and "tasks_per_s" in out
    assert len(json.loads(answers.read_text())) == 9
    labels, _ = labels_of(db, cells)
    assert labels == truth
    usage = subprocess.run(
        [sys.executable, "-m", "bmcell.cli.main", "review", "--truth", str(path)],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert usage.returncode == 2 and "--simulate" in usage.stderr


def test_manifest_truth_through_the_segmenter(
    rt, stack: Stack, operator_token: str, admin_token: str, tmp_path
) -> None:
    """Synthetic fields uploaded to the segmenter map back to the manifest's classes."""

    from bmcell.grpc_client import bearer
    from bmcell.synth import generate_dataset
    from bmcell.v1 import segmenter_pb2, segmenter_pb2_grpc

    db, _store, url = rt
    seed = int(uuid.uuid4().int % 10**6)  # fresh bytes: no duplicate of another test's field
    manifest = generate_dataset(tmp_path, labs=1, specimens=1, fields=2, seed=seed, size=512)
    spec = manifest.specimens[0]
    lab = f"{spec.lab}-{uuid.uuid4().hex[:6]}"

    def requests(data: bytes, name: str):
        yield segmenter_pb2.UploadRequest(
            header=segmenter_pb2.UploadHeader(lab=lab, specimen=spec.id, filename=name)
        )
        yield segmenter_pb2.UploadRequest(chunk=data)

    with tls.grpc_channel(stack.config.addr("segmenter")) as ch:
        stub = segmenter_pb2_grpc.SegmenterStub(ch)
        for rec in spec.fields:
            path = tmp_path / rec.image
            stub.Upload(
                requests(path.read_bytes(), path.name),
                metadata=bearer(operator_token),
                timeout=300,
            )
    with db.connection() as conn:
        cells = conn.execute(
            """SELECT c.id, c.status FROM cells c JOIN labs l ON l.id = c.lab_id
                WHERE l.code = %s ORDER BY c.id""",
            (lab,),
        ).fetchall()
    counted = [c["id"] for c in cells if c["status"] != "excluded"]
    assert counted, "the segmenter found no whole cell"
    index = TruthIndex.from_manifest(
        tmp_path / "manifest.json",
        segmenter_cells(stack.config.addr("segmenter"), operator_token),
        labs={spec.lab: lab},
    )
    placed = {c: index.truth(c) for c in counted if index.truth(c) is not None}
    assert len(placed) >= 0.6 * len(counted), (len(placed), len(counted))
    assert set(placed.values()) <= set(CODES)
    # the segmented cells of a field are placed on distinct manifest cells mostly
    assert len(placed) == len(index.mapping().keys() & set(counted))

    with db.transaction() as conn:
        conn.execute(
            """WITH pool AS (UPDATE cells SET status = 'pending' WHERE id = ANY(%s) RETURNING id)
               INSERT INTO review_tasks (cell_id, kind, required_reviews)
               SELECT id, 'initial', 1 FROM pool""",
            (list(placed),),
        )
    stats = simulate_reviews(
        url,
        admin_token,
        index,
        reviewers=2,
        seed=0,
        labs=[lab],
        user_prefix=f"sim-{lab}",
        adjudicate=False,
    )
    assert stats.reviews == len(placed) and stats.unknown_truth == 0
    labels, _ = labels_of(db, list(placed))
    assert labels == placed
