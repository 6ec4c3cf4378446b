"""Trainer service on the embedded stack's real Ray, Postgres, S3 server and Triton.

Data are tiny (17 classes x a few synthetic crops, 32x32 inputs, a few epochs) so
that the whole file runs in a few minutes on 2 shared cores; accuracy is measured
by ``bench/bench_trainer.py``, not here. Fault tolerance is tested for real: a Ray
worker is killed with SIGKILL, and the trainer process is stopped and started
again through the Stack API, each in the middle of a job.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import grpc
import pytest

from bmcell import thumbs
from bmcell.db import Database
from bmcell.modelstore import state_dict_key
from bmcell.stack import Stack
from bmcell.storage import ObjectStore
from bmcell.synth import crop_rng, lab_style, render_crop
from bmcell.taxonomy import DEFAULT_TAXONOMY
from bmcell.v1 import (
    classifier_pb2,
    classifier_pb2_grpc,
    rounds_pb2,
    rounds_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from services.trainer import runner
from tests.integration.seed import png, retire_active_model, seed_cells

pytestmark = pytest.mark.integration
INPUT = 32
CROP = 96


# --- seeding a labelled study ------------------------------------------------------------


def synth_crops(
    seed: int, labs: list[str], per_class: int, size: int, offset: int = 0
) -> tuple[list[bytes], list[str]]:
    """``per_class`` crops of every class, spread over ``labs``, as PNG bytes."""
    images, codes = [], []
    for code in DEFAULT_TAXONOMY.codes:
        for i in range(per_class):
            lab = labs[i % len(labs)]
            rng = crop_rng(seed, lab, code, offset + i)
            image, _ = render_crop(rng, lab_style(seed, lab), code, size=size)
            images.append(png(image))
            codes.append(code)
    return images, codes


def seed_study(
    db: Database,
    store: ObjectStore,
    *,
    train_per_class: int,
    val_per_class: int,
    test_per_class: int,
    size: int = CROP,
    seed: int = 3,
    number: int = 1,
    strategy: str = "bootstrap",
    params: dict | None = None,
) -> dict:
    """A ``strategy`` round with ``initial`` labels from three labs, ``validation`` labels from the
    same labs and ``test`` labels on a test specimen of a fourth lab.

    The round row is written in a final state so that the stack's rounds service
    leaves it alone: these tests call StartTraining themselves.
    """
    experiment = f"trainer-{uuid.uuid4().hex[:8]}"
    with db.transaction() as conn:
        round_id = conn.execute(
            "INSERT INTO rounds (experiment, number, strategy, state, params) "
            "VALUES (%s, %s, %s, 'published', %s) RETURNING id",
            (experiment, number, strategy, json.dumps(params or {})),
        ).fetchone()["id"]
    out: dict = {"round_id": round_id}
    splits = [
        ("initial", train_per_class, ["lab-a", "lab-b", "lab-c"], 0, False),
        ("validation", val_per_class, ["lab-a", "lab-b", "lab-c"], 10_000, False),
        ("test", test_per_class, ["lab-e"], 20_000, True),
    ]
    for source, per_class, labs, offset, is_test in splits:
        images, codes = synth_crops(seed, labs, per_class, size, offset)
        ids = seed_cells(db, store, images, lab=f"{experiment}-{source}", is_test=is_test)
        with db.transaction() as conn:
            for cell_id, code in zip(ids, codes, strict=True):
                conn.execute(
                    "INSERT INTO labels (cell_id, class_code, source, round_id, round_added) "
                    "VALUES (%s, %s, %s, %s, 0)",
                    (cell_id, code, source, round_id),
                )
        out[source] = ids
    return out


# --- fixtures and helpers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer(stack: Stack, operator_channel):
    with operator_channel(stack.config.addr("trainer")) as ch:
        yield trainer_pb2_grpc.TrainerStub(ch)


def start(trainer, round_id: int, epochs: int, **kw) -> trainer_pb2.TrainingJob:
    request = trainer_pb2.StartTrainingRequest(
        round_id=round_id, epochs=epochs, input_size=INPUT, batch_size=16, **kw
    )
    return trainer.StartTraining(request, timeout=60)


def wait_for(trainer, job_id: str, done, timeout_s: float = 240.0) -> trainer_pb2.TrainingJob:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            job = trainer.GetJob(trainer_pb2.GetJobRequest(job_id=job_id), timeout=10)
        except grpc.RpcError:  # the trainer is restarting
            time.sleep(0.5)
            continue
        if done(job):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not get there in {timeout_s}s: {job}")


def job_row(db: Database, job_id: str) -> dict:
    with db.connection() as conn:
        return conn.execute("SELECT * FROM training_jobs WHERE id = %s", (job_id,)).fetchone()


def assert_resumed_after(db: Database, job_id: str, epochs: int, interrupted_at: int) -> None:
    """Every epoch once; epochs done before the interruption were not trained again."""
    history = job_row(db, job_id)["history"]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    starts = [h["start"] for h in history]
    assert starts == sorted(starts) and starts[-1] >= 1, starts
    # Checkpoints are written every epoch: at most the epoch in flight is redone.
    first_after = next(h["epoch"] for h in history if h["start"] >= 1)
    assert first_after >= interrupted_at, (first_after, interrupted_at, history)


def assert_served_calibrated(
    metrics, store, db, settings, version, study, stack, operator_channel
) -> None:
    """The version carries a validation-fitted temperature, and the classifier serves
    softmax(logits / T) of the published weights with calibrated=true."""
    import io

    import numpy as np
    import torch

    from bmcell import calibration
    from bmcell.network import CellClassifier

    cal = metrics["calibration"]
    assert cal["temperature"] > 0 and cal["bins"] == 15 and cal["split"] == "validation"
    assert cal["n"] == metrics["validation"]["n"]
    assert cal["nll_after"] <= cal["nll_before"] + 1e-9
    cells = study["test"][:4]
    with operator_channel(stack.config.addr("classifier")) as ch:
        got = classifier_pb2_grpc.ClassifierStub(ch).Classify(
            classifier_pb2.ClassifyRequest(cell_ids=cells, model_version=version), timeout=60
        )
    assert got.calibrated and got.model_version == version
    model = CellClassifier(DEFAULT_TAXONOMY.num_classes)
    state = torch.load(io.BytesIO(store.get(state_dict_key(settings.model_name, version))))
    model.load_state_dict(state)
    model.eval()
    with db.connection() as conn:
        size = conn.execute(
            "SELECT input_size FROM model_versions WHERE model_name = %s AND version = %s",
            (settings.model_name, version),
        ).fetchone()["input_size"]
    x = torch.from_numpy(thumbs.to_batch(thumbs.fetch(db, store, cells, size)))
    with torch.no_grad():
        z = model(x).double().numpy()
    want = calibration.softmax(z / cal["temperature"])
    served = np.array([list(r.probabilities) for r in got.results])
    np.testing.assert_allclose(served, want, atol=2e-4)


# --- tests -------------------------------------------------------------------------------


def test_round_training_publishes_and_is_idempotent(
    rt, trainer, stack: Stack, operator_channel
) -> None:
    settings, db, store = rt
    with db.transaction() as conn:
        # A round without a served model trains from scratch (lr 0.01); not being a
        # bootstrap it has no absolute gate to pass (test_below_gate_bootstrap_...).
        retire_active_model(conn, settings.model_name)
    study = seed_study(
        db, store, train_per_class=3, val_per_class=2, test_per_class=2, strategy="cst"
    )
    job = start(trainer, study["round_id"], epochs=2, num_workers=2)
    again = start(trainer, study["round_id"], epochs=5)
    assert again.job_id == job.job_id  # one live job per round

    request = trainer_pb2.GetJobRequest(job_id=job.job_id)
    seen = list(trainer.WatchJob(request, timeout=300))
    # Progress streams while it trains (a watch that starts late under load may miss
    # epoch 1, never the order or the last epoch).
    epochs = [p.epoch for p in seen if p.state == "running" and p.epoch]
    assert epochs and epochs == sorted(epochs) and epochs[-1] == 2, epochs
    assert seen[-1].state == "succeeded", seen[-1]
    final = trainer.GetJob(request, timeout=10)
    assert final.published and final.model_version > 0, final

    row = job_row(db, job.job_id)
    plan = row["config"]
    train_ids = {c for _, _, c in plan["train"]}
    # Every trainable label of the system is used (other modules add some); the
    # study's validation and test cells never are.
    assert set(study["initial"]) <= train_ids
    assert not train_ids & (set(study["validation"]) | set(study["test"]))
    with db.connection() as conn:
        held_out = {
            r["cell_id"]
            for r in conn.execute(
                "SELECT cell_id FROM labels WHERE source IN ('validation', 'test')"
            )
        }
    assert not train_ids & held_out
    assert plan["learning_rate"] == settings_lr_first()
    report = trainer.GetModelReport(
        trainer_pb2.GetModelReportRequest(version=final.model_version), timeout=10
    )
    metrics = json.loads(report.metrics_json)
    assert report.state == "active"
    # Evaluated on exactly the plan's test split (every test label of the system up to
    # this round; other modules add some), which holds the study's test cells.
    test_split = {c for _, _, c in plan["test"]}
    assert metrics["test"]["n"] == len(test_split) >= 2 * 17
    assert set(study["test"]) <= test_split
    assert len(metrics["test"]["codes"]) == 16  # BN+ART merged
    assert metrics["validation"]["accuracy"] == pytest.approx(report.validation_accuracy)
    # Balanced accuracy and macro-F1 beside accuracy, and where the test figures come from.
    assert report.test_balanced_accuracy == pytest.approx(metrics["test"]["mean_recall"])
    assert metrics["test_balanced_accuracy"] == pytest.approx(report.test_balanced_accuracy)
    assert metrics["test_macro_f1"] == pytest.approx(report.test_macro_f1)
    assert metrics["test_macro_f1"] == pytest.approx(metrics["test"]["macro_f1"])
    assert metrics["validation_macro_f1"] == pytest.approx(report.validation_macro_f1)
    assert report.validation_balanced_accuracy == pytest.approx(
        metrics["validation_balanced_accuracy"]
    )
    assert report.test_set == metrics["test_set"]
    assert report.test_set.startswith(f"test specimens: {len(test_split)} cells from ")
    assert "per evaluation class" in report.test_set
    assert store.get(report.confusion_key)[:8] == b"\x89PNG\r\n\x1a\n"
    assert store.exists(state_dict_key(settings.model_name, final.model_version))
    with operator_channel(stack.config.addr("classifier")) as ch:
        listed = classifier_pb2_grpc.ClassifierStub(ch).ListModels(
            classifier_pb2.ListModelsRequest(), timeout=10
        )
    assert listed.active_version == final.model_version
    assert_served_calibrated(
        metrics, store, db, settings, final.model_version, study, stack, operator_channel
    )

    # Round 2 transfers from it; a gate that it cannot pass rejects it.
    with db.transaction() as conn:
        conn.execute(
            "UPDATE model_versions SET validation_accuracy = 1.0 WHERE model_name = %s "
            "AND version = %s",
            (settings.model_name, final.model_version),
        )
        round2 = conn.execute(
            "INSERT INTO rounds (experiment, number, strategy, state) "
            "SELECT experiment, 2, 'cst', 'published' FROM rounds WHERE id = %s RETURNING id",
            (study["round_id"],),
        ).fetchone()["id"]
    job2 = start(trainer, round2, epochs=1, max_accuracy_drop=0.001)
    done = wait_for(trainer, job2.job_id, lambda j: j.state not in ("queued", "running"))
    assert done.state == "succeeded" and not done.published, done
    assert "rejected" in done.message and "below active" in done.message
    plan2 = job_row(db, job2.job_id)["config"]
    assert plan2["init_version"] == final.model_version and plan2["learning_rate"] == 0.005
    report2 = trainer.GetModelReport(
        trainer_pb2.GetModelReportRequest(version=done.model_version), timeout=10
    )
    assert report2.state == "rejected" and "below active" in report2.note


def test_a_job_trains_and_evaluates_from_thumbs_reading_no_crop(
    rt, trainer, stack: Stack, operator_channel
) -> None:
    """The driver reads the cells' thumbs once and stages them; no worker epoch and no
    evaluation reads a crop: with the study's crops gone from object storage the job
    still trains, validates, checkpoints and evaluates. Its progress says how long
    each epoch took, through the trainer's calls and through the round."""
    settings, db, store = rt
    # A seed of its own: crops are content-addressed, so no other test's cells share them.
    study = seed_study(
        db, store, train_per_class=3, val_per_class=1, test_per_class=1, seed=17, strategy="cst"
    )
    ids = [*study["initial"], *study["validation"], *study["test"]]
    thumbs.fetch(db, store, ids, INPUT)  # the thumbs at this input size, made from the crops
    with db.connection() as conn:
        keys = [
            r["crop_key"]
            for r in conn.execute("SELECT crop_key FROM cells WHERE id = ANY(%s)", (ids,))
        ]
    crops = {k: store.get(k) for k in keys}
    for key in crops:
        store.delete(key)
    try:
        epochs = 3
        job = start(trainer, study["round_id"], epochs=epochs, num_workers=2)
        seen = list(trainer.WatchJob(trainer_pb2.GetJobRequest(job_id=job.job_id), timeout=300))
        done = trainer.GetJob(trainer_pb2.GetJobRequest(job_id=job.job_id), timeout=10)
        assert done.state == "succeeded" and done.model_version > 0, done
        assert not any(store.exists(k) for k in crops)  # nobody needed them back
    finally:
        for key, data in crops.items():
            store.put(key, data, "image/png")
    assert not store.exists(runner.inputs_key(job.job_id))  # staged for the run only

    history = job_row(db, job.job_id)["history"]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    for h in history:  # the epoch's wall time holds its training, validation and checkpoint
        parts = h["train_seconds"] + h["validation_seconds"] + h["checkpoint_seconds"]
        assert 0 < parts <= h["seconds"] + 1e-6, h
    running = [p for p in seen if p.state == "running" and p.epoch]
    assert running and all(p.epoch_seconds > 0 for p in running), running
    assert running[-1].epoch == epochs
    # The job's message after an epoch says it in words, its seconds with it.
    lines = [p.message for p in running if p.message.startswith(f"epoch {p.epoch}/{epochs}: ")]
    assert lines and all(" s (" in m and m.endswith(" samples/s)") for m in lines), running
    assert done.epoch_seconds == pytest.approx(history[-1]["seconds"])
    assert done.training_seconds == pytest.approx(sum(h["seconds"] for h in history))
    assert done.loss == pytest.approx(history[-1]["loss"]) and done.samples_per_second > 0
    # The round shows its job's progress too (what `bmcell round start --wait` and the
    # demo print an epoch line from).
    with operator_channel(stack.config.addr("rounds")) as ch:
        r = rounds_pb2_grpc.RoundsStub(ch).GetRound(
            rounds_pb2.GetRoundRequest(round_id=study["round_id"]), timeout=10
        )
    assert r.training_job == job.job_id
    assert (r.training.epoch, r.training.epochs) == (epochs, epochs)
    assert r.training.epoch_seconds == pytest.approx(done.epoch_seconds)
    assert r.training.state == "succeeded"


def test_below_gate_bootstrap_is_not_served(rt, trainer, stack: Stack, operator_channel) -> None:
    settings, db, store = rt
    with operator_channel(stack.config.addr("classifier")) as ch:
        classifier = classifier_pb2_grpc.ClassifierStub(ch)
        served = classifier.ListModels(classifier_pb2.ListModelsRequest(), timeout=10)
        assert served.active_version > 0  # the previous test's version
        # One epoch on a handful of cells cannot reach this round's gate.
        study = seed_study(
            db, store, train_per_class=2, val_per_class=2, test_per_class=1, params={"gate": 0.99}
        )
        job = start(trainer, study["round_id"], epochs=1, num_workers=1)
        done = wait_for(trainer, job.job_id, lambda j: j.state not in ("queued", "running"))
        assert done.state == "succeeded" and not done.published, done
        assert "below the bootstrap gate 0.99" in done.message
        report = trainer.GetModelReport(
            trainer_pb2.GetModelReportRequest(version=done.model_version), timeout=10
        )
        assert report.state == "rejected" and "not served" in report.note
        # The classifier keeps answering with the version it served before.
        cells = classifier_pb2.ClassifyRequest(cell_ids=study["test"][:2])
        assert classifier.Classify(cells, timeout=60).model_version == served.active_version
        with pytest.raises(grpc.RpcError) as err:
            classifier.ActivateModel(
                classifier_pb2.ActivateModelRequest(version=done.model_version), timeout=60
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        # With no version that passed a gate it refuses, and says why.
        with db.transaction() as conn:
            retire_active_model(conn, settings.model_name)
        time.sleep(1.5)  # the classifier's cache of the active row
        pool = classifier_pb2.PredictPoolRequest(cell_ids=study["test"])
        for call in (
            lambda: classifier.Classify(cells, timeout=60),
            lambda: list(classifier.PredictPool(pool, timeout=60)),  # a stream
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert err.value.details().startswith("no model passed the gate yet")
        # What the previous test served is served again for the modules after this one.
        classifier.ActivateModel(
            classifier_pb2.ActivateModelRequest(version=served.active_version), timeout=60
        )


def settings_lr_first() -> float:
    from bmcell.settings import TrainerSettings

    return TrainerSettings.model_fields["learning_rate_first"].default


def test_killed_worker_resumes_from_last_checkpoint(rt, trainer) -> None:
    _settings, db, store = rt
    study = seed_study(db, store, train_per_class=6, val_per_class=1, test_per_class=1)
    epochs = 6
    job = start(trainer, study["round_id"], epochs=epochs, num_workers=1)
    running = wait_for(trainer, job.job_id, lambda j: j.epoch >= 2)
    assert running.state == "running"
    pid = runner.worker_pids(store, job.job_id)[0]["pid"]
    killed_at = running.epoch
    os.kill(pid, signal.SIGKILL)

    done = wait_for(trainer, job.job_id, lambda j: j.state not in ("queued", "running"))
    assert done.state == "succeeded", done
    assert runner.worker_pids(store, job.job_id)[0]["pid"] != pid
    assert_resumed_after(db, job.job_id, epochs, killed_at)


def test_restarted_trainer_resumes_its_running_job(rt, trainer, stack: Stack) -> None:
    _settings, db, store = rt
    study = seed_study(db, store, train_per_class=6, val_per_class=1, test_per_class=1)
    epochs = 6
    job = start(trainer, study["round_id"], epochs=epochs, num_workers=1)
    # Jobs that ended failed or cancelled are never started again by themselves: two as
    # an earlier process left them (the same plan, never trained).
    with db.transaction() as conn:
        ended_ids = [
            conn.execute(
                "INSERT INTO training_jobs (id, round_id, config, epochs, state, message) "
                "SELECT %s, round_id, config, epochs, %s, %s FROM training_jobs WHERE id = %s "
                "RETURNING id",
                (f"train-{uuid.uuid4().hex[:12]}", state, message, job.job_id),
            ).fetchone()["id"]
            for state, message in (("failed", "RuntimeError: boom"), ("cancelled", "by request"))
        ]
    running = wait_for(trainer, job.job_id, lambda j: j.epoch >= 2)
    stopped_at = running.epoch
    pid = stack._load_state()["components"]["trainer"]["pid"]
    stack._stop_pid("trainer", pid)
    assert job_row(db, job.job_id)["state"] == "running"  # left for the next process
    ended = {i: job_row(db, i) for i in ended_ids}
    stack.up(only=["trainer"])

    done = wait_for(trainer, job.job_id, lambda j: j.state not in ("queued", "running"))
    assert done.state == "succeeded", done
    assert_resumed_after(db, job.job_id, epochs, stopped_at)
    for job_id, before in ended.items():
        after = job_row(db, job_id)
        assert (after["state"], after["updated_at"]) == (before["state"], before["updated_at"])
        assert runner.read_progress(store, job_id) is None  # no Ray run was started for it
    with db.connection() as conn:
        jobs_of_round = conn.execute(
            "SELECT id FROM training_jobs WHERE round_id = %s", (study["round_id"],)
        ).fetchall()
    assert {r["id"] for r in jobs_of_round} == {job.job_id, *ended_ids}


def test_cancel_stops_the_run(rt, trainer) -> None:
    _settings, db, store = rt
    study = seed_study(db, store, train_per_class=2, val_per_class=1, test_per_class=1)
    job = start(trainer, study["round_id"], epochs=200, num_workers=1)
    wait_for(trainer, job.job_id, lambda j: j.epoch >= 1)
    cancelled = trainer.CancelJob(trainer_pb2.GetJobRequest(job_id=job.job_id), timeout=10)
    assert cancelled.state == "cancelled"
    # The workers stop at their next epoch's end: the epoch count stops growing.
    time.sleep(8)
    epoch = job_row(db, job.job_id)["epoch"]
    time.sleep(4)
    assert job_row(db, job.job_id)["epoch"] == epoch < 200
    # A cancelled round can be trained again: a new job.
    assert start(trainer, study["round_id"], epochs=1).job_id != job.job_id
    bad = trainer_pb2.StartTrainingRequest(round_id=study["round_id"], input_size=40)
    with pytest.raises(grpc.RpcError) as err:
        trainer.StartTraining(bad, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
