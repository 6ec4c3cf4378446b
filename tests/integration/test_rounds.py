"""Rounds end to end through the services: bootstrap, then a CST+AL round."""

from __future__ import annotations

import grpc
import pytest

from bmcell import grpc_client
from bmcell.db import Database
from bmcell.review_sim import TruthIndex
from bmcell.scenario import Reviewers, run_round
from bmcell.settings import Settings, load
from bmcell.stack import Stack
from bmcell.storage import ObjectStore
from bmcell.v1 import rounds_pb2, rounds_pb2_grpc, selector_pb2
from tests.integration.seed import retire_active_model, seed_cells, small_bootstrap, synth_crops

pytestmark = pytest.mark.integration
EXPERIMENT = "rounds-test"


@pytest.fixture(scope="module")
def world(stack: Stack, operator_token: str, admin_token: str):
    settings = load(Settings)
    db = Database(settings).open()
    store = ObjectStore(settings).ensure_buckets()
    lab = "lab-rounds"
    train_crops, train_truth = synth_crops(17 * 8, seed=21)
    test_crops, test_truth = synth_crops(17 * 3, seed=22)
    train_ids = seed_cells(db, store, train_crops, lab=lab)
    test_ids = seed_cells(db, store, test_crops, lab=lab, is_test=True)
    truth = TruthIndex.from_mapping(
        dict(zip(train_ids + test_ids, train_truth + test_truth, strict=True))
    )
    yield (
        {**stack.env(), "token": operator_token, "admin_token": admin_token},
        db,
        truth,
        set(test_ids),
    )
    db.close()


def _run(env, db, truth, request: rounds_pb2.StartRoundRequest) -> rounds_pb2.Round:
    r, _ = run_round(
        env["BMCELL_ROUNDS_ADDR"],
        request,
        token=env["token"],
        labelapi_url=env["BMCELL_LABELAPI_URL"],
        admin_token=env["admin_token"],
        truth=truth,
        reviewers=Reviewers(count=3, error_rate=0.0, difficult_rate=0.0),
        say=print,
        poll_s=0.5,
    )
    return r


def test_round_needs_bootstrap_first(world) -> None:
    env, *_ = world
    stub = rounds_pb2_grpc.RoundsStub(
        grpc_client.channel(env["BMCELL_ROUNDS_ADDR"], token=env["token"])
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.StartRound(
            rounds_pb2.StartRoundRequest(experiment=EXPERIMENT, strategy="cst+al"), timeout=30
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "bootstrap" in err.value.details()


def test_bootstrap_then_cst_al_round(world) -> None:
    env, db, truth, test_ids = world
    with db.transaction() as conn:
        retire_active_model(conn, load(Settings).model_name)
        # The validation split is carved out once per database, by its first bootstrap.
        split_before = conn.execute(
            "SELECT count(*) AS n FROM labels WHERE source = 'validation'"
        ).fetchone()["n"]
        # A round written by other means than StartRound is not the driver's to move.
        bystander = conn.execute(
            "INSERT INTO rounds (experiment, number, strategy) VALUES ('bystander', 0, 'cst') "
            "RETURNING id"
        ).fetchone()["id"]
    boot = _run(
        env,
        db,
        truth,
        small_bootstrap(EXPERIMENT, "lab-rounds", test_reviews=2),
    )
    with db.connection() as conn:
        sources = {
            r["source"]: r["n"]
            for r in conn.execute(
                "SELECT source, count(*) AS n FROM labels l JOIN cells c ON c.id = l.cell_id "
                "JOIN labs ON labs.id = c.lab_id WHERE labs.code = 'lab-rounds' GROUP BY source"
            )
        }
        test_labels = {
            r["cell_id"]
            for r in conn.execute(
                "SELECT l.cell_id FROM labels l JOIN cells c ON c.id = l.cell_id "
                "JOIN labs ON labs.id = c.lab_id WHERE l.source = 'test' AND labs.code = 'lab-rounds'"
            )
        }
        wrong = conn.execute(
            "SELECT l.cell_id, l.class_code FROM labels l WHERE l.round_id = %s", (boot.round_id,)
        ).fetchall()
    # Test labels come only from test specimens; the validation split was carved out once.
    assert test_labels and test_labels <= test_ids
    if split_before:
        assert sources.get("validation", 0) == 0  # never reshuffled
    else:
        assert sources.get("validation", 0) >= 17
    assert sources.get("initial", 0) >= 17 * 3 - 17
    assert all(truth.truth(r["cell_id"]) == r["class_code"] for r in wrong)
    assert boot.state == "published", boot.message
    with db.connection() as conn:
        untouched = conn.execute("SELECT state FROM rounds WHERE id = %s", (bystander,)).fetchone()
    assert untouched["state"] == "created"
    r = _run(
        env,
        db,
        truth,
        rounds_pb2.StartRoundRequest(
            experiment=EXPERIMENT,
            strategy="cst+al",
            epochs=2,
            selection=selector_pb2.SelectionParameters(sample_size=40, seed=9, labs=["lab-rounds"]),
        ),
    )
    assert r.state == "published", r.message
    assert r.number == 1 and r.model_in == boot.model_out and r.model_out > boot.model_out
    assert r.tasks_by_state.get("open", 0) == 0
    assert r.labels_added == sum(r.labels_added_by_class.values())
    with db.connection() as conn:
        state = conn.execute("SELECT state FROM rounds WHERE id = %s", (bystander,)).fetchone()
    assert state["state"] == "created"
