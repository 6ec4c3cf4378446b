"""Rounds end to end through the services: bootstrap, then a CST+AL round."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from bmcell import grpc_client
from bmcell.db import Database
from bmcell.review_sim import TruthIndex
from bmcell.scenario import Reviewers, run_round
from bmcell.settings import Settings, load
from bmcell.stack import Stack
from bmcell.storage import ObjectStore
from bmcell.v1 import rounds_pb2, rounds_pb2_grpc, selector_pb2, trainer_pb2, trainer_pb2_grpc
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
    truth_map = dict(zip(train_ids + test_ids, train_truth + test_truth, strict=True))
    truth = TruthIndex.from_mapping(truth_map)
    yield (
        {**stack.env(), "token": operator_token, "admin_token": admin_token},
        db,
        truth,
        set(test_ids),
        store,
        truth_map,
    )
    db.close()


def _run(
    env, db, truth, request: rounds_pb2.StartRoundRequest, said: list[str] | None = None
) -> rounds_pb2.Round:
    def say(line: str) -> None:
        print(line)
        if said is not None:
            said.append(line)

    r, _ = run_round(
        env["BMCELL_ROUNDS_ADDR"],
        request,
        token=env["token"],
        labelapi_url=env["BMCELL_LABELAPI_URL"],
        admin_token=env["admin_token"],
        truth=truth,
        reviewers=Reviewers(count=3, error_rate=0.0, difficult_rate=0.0),
        say=say,
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
    env, db, truth, test_ids, store, truth_map = world
    with db.transaction() as conn:
        retire_active_model(conn, load(Settings).model_name)
        # A round written by other means than StartRound is not the driver's to move.
        bystander = conn.execute(
            "INSERT INTO rounds (experiment, number, strategy) VALUES ('bystander', 0, 'cst') "
            "RETURNING id"
        ).fetchone()["id"]
    said: list[str] = []
    boot = _run(env, db, truth, small_bootstrap(EXPERIMENT, "lab-rounds", test_reviews=2), said)
    # While it trained, the round said how each epoch went and how long it took.
    epochs = [line.strip() for line in said if line.strip().startswith("epoch ")]
    assert epochs, said
    assert all(" s (" in line and line.endswith(" samples/s)") for line in epochs), epochs
    assert boot.training.epoch == boot.training.epochs and boot.training.epoch_seconds > 0
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
        initial_by_class = {
            r["class_code"]: r["n"]
            for r in conn.execute(
                "SELECT class_code, count(*) AS n FROM labels WHERE round_id = %s "
                "AND source = 'initial' GROUP BY class_code",
                (boot.round_id,),
            )
        }
    # Test labels come only from test specimens; the experiment's validation split is
    # its own (labels count per experiment) and leaves every class its initial quota.
    assert test_labels and test_labels <= test_ids
    assert sources.get("validation", 0) >= 17
    assert sources.get("initial", 0) >= 17 * 3 - 17
    assert len(initial_by_class) == 17 and min(initial_by_class.values()) >= 3
    assert list(boot.short_classes) == [], boot.message
    assert all(truth.truth(r["cell_id"]) == r["class_code"] for r in wrong)
    assert boot.state == "published", boot.message
    with db.connection() as conn:
        untouched = conn.execute("SELECT state FROM rounds WHERE id = %s", (bystander,)).fetchone()
    assert untouched["state"] == "created"
    cst_al = rounds_pb2.StartRoundRequest(
        experiment=EXPERIMENT,
        strategy="cst+al",
        epochs=2,
        selection=selector_pb2.SelectionParameters(sample_size=40, seed=9, labs=["lab-rounds"]),
    )
    # The bootstrap reviewed the whole pool: a round finds nothing and trains nothing.
    empty = _run(env, db, truth, cst_al)
    assert empty.state == "published" and "nothing to add" in empty.message, empty.message
    assert empty.model_in == empty.model_out == boot.model_out and not empty.promoted
    assert _jobs(db, empty.round_id) == []

    crops, codes = synth_crops(40, seed=23)
    fresh = seed_cells(db, store, crops, lab="lab-rounds")
    truth = TruthIndex.from_mapping({**truth_map, **dict(zip(fresh, codes, strict=True))})
    # The round's first training job is cancelled as soon as it exists.
    trainer = trainer_pb2_grpc.TrainerStub(
        grpc_client.channel(env["BMCELL_TRAINER_ADDR"], default_timeout_s=30, token=env["token"])
    )
    cancelled: list[str] = []
    watcher = threading.Thread(
        target=_cancel_first_job, args=(db, trainer, empty.number + 1, cancelled), daemon=True
    )
    watcher.start()
    r = _run(env, db, truth, cst_al)
    watcher.join(timeout=30)
    assert cancelled, "no training job to cancel"
    assert r.state == "failed" and r.failed_step == "training", r.message
    assert cancelled[0] in r.message and "cancelled" in r.message
    # Not started again by itself: 3 driver ticks (1 s each) later, still one job.
    time.sleep(4)
    assert [j["id"] for j in _jobs(db, r.round_id)] == cancelled
    assert _stub(env).GetRound(rounds_pb2.GetRoundRequest(round_id=r.round_id)).state == "failed"

    stub = _stub(env)
    for round_id, code in (
        (boot.round_id, grpc.StatusCode.FAILED_PRECONDITION),  # published: nothing to retry
        (0, grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(grpc.RpcError) as err:
            stub.RetryRound(rounds_pb2.RetryRoundRequest(round_id=round_id), timeout=30)
        assert err.value.code() == code, err.value.details()
    again = stub.RetryRound(rounds_pb2.RetryRoundRequest(round_id=r.round_id), timeout=30)
    assert again.state == "training" and again.round_id == r.round_id
    r = _follow(stub, r.round_id)
    jobs = _jobs(db, r.round_id)
    assert len(jobs) == 2 and jobs[0]["id"] == cancelled[0] and jobs[1]["state"] == "succeeded"
    with db.connection() as conn:
        retried = conn.execute(
            "SELECT actor_role, after FROM audit_log WHERE action = 'round.retry' "
            "AND entity_id = %s",
            (str(r.round_id),),
        ).fetchall()
    assert [(a["actor_role"], a["after"]) for a in retried] == [("operator", {"state": "training"})]

    assert r.state == "published", r.message
    assert r.number == 2 and r.model_in == boot.model_out and r.model_out > boot.model_out
    assert r.tasks_by_state.get("open", 0) == 0
    assert r.labels_added == sum(r.labels_added_by_class.values()) > 0
    with db.connection() as conn:
        state = conn.execute("SELECT state FROM rounds WHERE id = %s", (bystander,)).fetchone()
    assert state["state"] == "created"


def _stub(env) -> rounds_pb2_grpc.RoundsStub:
    return rounds_pb2_grpc.RoundsStub(
        grpc_client.channel(env["BMCELL_ROUNDS_ADDR"], default_timeout_s=30, token=env["token"])
    )


def _jobs(db: Database, round_id: int) -> list[dict]:
    with db.connection() as conn:
        return conn.execute(
            "SELECT id, state FROM training_jobs WHERE round_id = %s ORDER BY created_at",
            (round_id,),
        ).fetchall()


def _cancel_first_job(db: Database, trainer, number: int, out: list[str]) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        with db.connection() as conn:
            row = conn.execute(
                "SELECT t.id FROM training_jobs t JOIN rounds r ON r.id = t.round_id "
                "WHERE r.experiment = %s AND r.number = %s ORDER BY t.created_at LIMIT 1",
                (EXPERIMENT, number),
            ).fetchone()
        if row is not None:
            trainer.CancelJob(trainer_pb2.GetJobRequest(job_id=row["id"]))
            out.append(row["id"])
            return
        time.sleep(0.05)


def _follow(
    stub: rounds_pb2_grpc.RoundsStub, round_id: int, timeout_s: float = 240
) -> rounds_pb2.Round:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = stub.GetRound(rounds_pb2.GetRoundRequest(round_id=round_id))
        if r.state in ("published", "failed"):
            return r
        time.sleep(0.5)
    raise AssertionError(f"round {round_id} still {r.state} after {timeout_s}s")
