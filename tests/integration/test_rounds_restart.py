"""A round survives a hard kill of any one service mid-round (issue 9).

One CST+AL round after a bootstrap, driven by hand so that each service can be
SIGKILLed (its whole process group, no shutdown handlers) while the round needs it,
then started again through the Stack API:

* predicting: the classifier is frozen (SIGSTOP) so that the selection stays in
  flight; meanwhile ``rounds`` is killed with its SelectCandidates call open, then
  ``selector`` with its PredictPool call open, then the frozen ``classifier``;
* reviewing: ``labelapi`` is killed while simulated reviewers are answering, with
  leases held and answers already acknowledged;
* training: ``trainer`` is killed in the middle of the Ray Train run (the round's job
  is left ``running``), then ``rounds`` once more.

The round must end ``published`` with every task answered exactly once, every
acknowledged answer in Postgres, one label per task written once, one training job
resumed from its checkpoint by the new trainer, and one model version.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from bmcell import grpc_client, tls
from bmcell.db import Database
from bmcell.review_sim import ReviewStats, TruthIndex, ensure_reviewers, simulate_reviews
from bmcell.scenario import Reviewers, run_round
from bmcell.settings import Settings, load
from bmcell.stack import Stack
from bmcell.storage import ObjectStore
from bmcell.v1 import rounds_pb2, rounds_pb2_grpc, selector_pb2
from services.rounds.driver import _LOCK_CLASS
from services.trainer import runner
from tests.integration.seed import retire_active_model, seed_cells, small_bootstrap, synth_crops

pytestmark = pytest.mark.integration
EXPERIMENT = "restart-test"
LAB = "lab-restart"
SAMPLE = 48  # cells sent to reviewers in the CST+AL round (every sampled cell, see below)
EPOCHS = 5
SERVICES = ("classifier", "selector", "trainer", "rounds", "labelapi")


# --- killing and restarting ------------------------------------------------------------


def pid_of(stack: Stack, name: str) -> int:
    return json.loads(stack.config.state_file.read_text())["components"][name]["pid"]


def signal_service(stack: Stack, name: str, sig: signal.Signals) -> int:
    """Send ``sig`` to the service's whole process group (each runs in its own session)."""
    pid = pid_of(stack, name)
    os.killpg(pid, sig)
    if sig == signal.SIGKILL:
        _reap(pid)
    print(f"[restart-test] {time.strftime('%H:%M:%S')} {name} (pid {pid}): {sig.name}", flush=True)
    return pid


def _reap(pid: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)  # the stack fixture started it: our child
            if done:
                return
        except ChildProcessError:
            if not os.path.exists(f"/proc/{pid}"):
                return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} survived SIGKILL for {timeout_s}s")


def kill_and_restart(stack: Stack, name: str, between: Callable[[], None] | None = None) -> None:
    signal_service(stack, name, signal.SIGKILL)
    if between is not None:
        between()
    stack.up(only=[name])


@contextlib.contextmanager
def all_services_running(stack: Stack) -> Iterator[None]:
    """Whatever happens, leave every service up for the tests after this module."""
    try:
        yield
    finally:
        for name in SERVICES:
            with contextlib.suppress(ProcessLookupError, KeyError):
                os.killpg(pid_of(stack, name), signal.SIGCONT)
        stack.up(only=list(SERVICES))


# --- reading the round from Postgres -----------------------------------------------------


def round_row(db: Database, round_id: int) -> dict:
    with db.connection() as conn:
        return conn.execute("SELECT * FROM rounds WHERE id = %s", (round_id,)).fetchone()


def wait_state(db: Database, round_id: int, state: str, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = round_row(db, round_id)
        if r["state"] == state:
            return r
        assert r["state"] != "failed", r["message"]
        time.sleep(0.1)
    raise AssertionError(f"round {round_id} still {r['state']} after {timeout_s}s, not {state}")


def step_held(db: Database, round_id: int, for_s: float = 1.0) -> bool:
    """Whether a rounds driver holds the round's advisory lock, without a break for
    ``for_s`` seconds."""
    deadline = time.monotonic() + for_s
    while True:
        held = scalar(
            db,
            "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND classid::bigint = %s AND objid::bigint = %s",
            _LOCK_CLASS,
            round_id,
        )
        if not held:
            return False
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.05)


def wait_for(what: str, probe: Callable[[], object], timeout_s: float = 120.0) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := probe():
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout_s}s")


def scalar(db: Database, sql: str, *args: object) -> object:
    with db.connection() as conn:
        row = conn.execute(sql, args).fetchone()
    return next(iter(row.values()))


# --- a reviewer by hand ------------------------------------------------------------------


class Reviewer:
    """One person on the labeling API, who can hold a lease across a restart."""

    def __init__(self, url: str, name: str, token: str, truth: TruthIndex) -> None:
        self.name = name
        self.truth = truth
        self.client = httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
            verify=tls.httpx_verify(),
        )

    def lease(self) -> dict:
        resp = self.client.post("/v1/tasks/next", params={"lab": LAB})
        assert resp.status_code == 200, resp.text
        return resp.json()

    def submit(self, task: dict) -> dict:
        true_class = self.truth.truth(task["cell"]["id"])
        body = {"lease_token": task["lease_token"], "answer": "correct", "class_code": true_class}
        if task["suggested_class"] == true_class:
            body = {"lease_token": task["lease_token"], "answer": "confirm"}
        resp = self.client.post(f"/v1/tasks/{task['task_id']}/submit", json=body)
        assert resp.status_code == 200, resp.text
        return resp.json()


# --- the module's world ------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(stack: Stack):
    settings = load(Settings)
    db = Database(settings).open()
    store = ObjectStore(settings).ensure_buckets()
    train_crops, train_truth = synth_crops(17 * 8, seed=31)
    test_crops, test_truth = synth_crops(17 * 3, seed=32)
    train_ids = seed_cells(db, store, train_crops, lab=LAB)
    test_ids = seed_cells(db, store, test_crops, lab=LAB, is_test=True)
    truth = dict(zip(train_ids + test_ids, train_truth + test_truth, strict=True))
    with all_services_running(stack):
        yield stack, db, store, truth
    db.close()


def test_round_survives_each_service_killed_mid_round(
    world, operator_token: str, admin_token: str
) -> None:
    stack, db, store, truth_map = world
    env = stack.env()
    truth = TruthIndex.from_mapping(truth_map)
    with db.transaction() as conn:
        retire_active_model(conn, load(Settings).model_name)
    boot, _ = run_round(
        env["BMCELL_ROUNDS_ADDR"],
        small_bootstrap(EXPERIMENT, LAB, test_reviews=1),
        token=operator_token,
        labelapi_url=env["BMCELL_LABELAPI_URL"],
        admin_token=admin_token,
        truth=truth,
        reviewers=Reviewers(count=3, error_rate=0.0, difficult_rate=0.0),
        say=print,
        poll_s=0.5,
    )
    assert boot.state == "published", boot.message

    # The bootstrap labelled the whole pool: the CST+AL round samples fresh cells.
    crops, codes = synth_crops(SAMPLE + 8, seed=33)
    pool_ids = seed_cells(db, store, crops, lab=LAB)
    truth_map.update(zip(pool_ids, codes, strict=True))
    truth = TruthIndex.from_mapping(truth_map)

    rounds = rounds_pb2_grpc.RoundsStub(
        grpc_client.channel(env["BMCELL_ROUNDS_ADDR"], default_timeout_s=30, token=operator_token)
    )

    # --- predicting: rounds, selector and classifier, each with a call in flight --------
    # A frozen classifier holds the selection open: the rounds service's
    # SelectCandidates waits on the selector, whose PredictPool waits on the classifier.
    signal_service(stack, "classifier", signal.SIGSTOP)
    started = time.monotonic()
    r = rounds.StartRound(
        rounds_pb2.StartRoundRequest(
            experiment=EXPERIMENT,
            strategy="cst+al",
            epochs=EPOCHS,
            # A margin and threshold of 0.5 put every sampled cell in CST (margin >= 0.5)
            # or AL (margin < 0.5): a known number of tasks, both kinds likely.
            selection=selector_pb2.SelectionParameters(
                sample_size=SAMPLE, seed=9, labs=[LAB], cst_threshold=0.5, al_margin=0.5
            ),
        )
    )
    round_id = r.round_id
    wait_state(db, round_id, "predicting", timeout_s=30)
    # The driver holds the round's advisory lock through its step: held for a while
    # means its SelectCandidates call is open (a refused call takes milliseconds).
    wait_for("the driver inside SelectCandidates", lambda: step_held(db, round_id), 60)

    def driver_gone() -> None:
        _assert_state(db, round_id, "predicting")
        # Postgres ends the dead driver's session, and the lock with it.
        wait_for("the lock released", lambda: not step_held(db, round_id, 0), 30)

    kill_and_restart(stack, "rounds", between=driver_gone)
    wait_for("the new driver inside SelectCandidates", lambda: step_held(db, round_id), 60)
    kill_and_restart(stack, "selector")
    wait_for("SelectCandidates open on the new selector", lambda: step_held(db, round_id), 60)
    _assert_state(db, round_id, "predicting")
    assert scalar(db, "SELECT count(*) AS n FROM selections WHERE round_id = %s", round_id) == 0
    kill_and_restart(stack, "classifier")  # SIGKILL ends a stopped process too
    wait_state(db, round_id, "reviewing", timeout_s=90)
    print(f"[restart-test] predicting done after {time.monotonic() - started:.1f}s", flush=True)

    tasks = _tasks(db, round_id)
    assert len(tasks) == SAMPLE and len({t["cell_id"] for t in tasks}) == SAMPLE
    assert {t["kind"] for t in tasks} <= {"cst", "al"}
    assert scalar(db, "SELECT count(*) AS n FROM selections WHERE round_id = %s", round_id) == 1

    # --- reviewing: labelapi dies with leases held and answers acknowledged -------------
    url = env["BMCELL_LABELAPI_URL"]
    holders = [
        Reviewer(url, name, token, truth)
        for name, token in ensure_reviewers(
            url, admin_token, 2, labs=[LAB], prefix="restart-holder", adjudicator=None
        )
    ]
    first = holders[0].lease()
    acknowledged = {first["lease_token"]: holders[0].submit(first)}
    held = [(h, h.lease()) for h in holders]  # one live lease each, not yet answered

    sim: dict[str, object] = {}

    def reviewers() -> None:
        try:
            sim["stats"] = simulate_reviews(
                url, admin_token, truth, reviewers=3, seed=3, labs=[LAB], stop_when_empty=True
            )
        except BaseException as exc:  # noqa: BLE001 - asserted below
            sim["error"] = exc

    thread = threading.Thread(target=reviewers, name="restart-reviewers", daemon=True)
    thread.start()
    wait_for(
        "simulated reviewers at work",
        lambda: _reviews(db, round_id) >= 4 or not thread.is_alive(),
        timeout_s=60,
    )
    kill_and_restart(stack, "labelapi")
    for h, task in held:  # leases live in Postgres: they outlast the process
        acknowledged[task["lease_token"]] = h.submit(task)
        assert acknowledged[task["lease_token"]]["replayed"] is False
    again = holders[0].submit(first)  # an answer sent twice is recorded once
    assert (
        again["replayed"] is True
        and again["status"] == acknowledged[first["lease_token"]]["status"]
    )
    thread.join(timeout=120)
    assert not thread.is_alive(), "simulated reviewers did not finish"
    assert "error" not in sim, f"simulated reviewers failed: {sim.get('error')!r}"
    stats = sim["stats"]
    assert isinstance(stats, ReviewStats)

    # --- training: the trainer dies mid-run, then the rounds service once more ---------
    wait_state(db, round_id, "training", timeout_s=60)
    # Past epoch 2, so that epoch 1's checkpoint is surely registered by Ray Train (the
    # newest one may not be yet when the kill comes: that epoch is then trained again).
    job = wait_for(
        "the round's training job past its second epoch",
        lambda: _job(db, round_id, lambda j: j["state"] == "running" and j["epoch"] >= 2),
        timeout_s=180,
    )
    assert job["epoch"] < EPOCHS, f"training ended before the trainer could be killed: {job}"
    interrupted_at = job["epoch"]
    worker_pid = runner.worker_pids(store, job["id"])[0]["pid"]
    kill_and_restart(
        stack,
        "trainer",
        between=lambda: _assert_job_state(db, job["id"], "running"),
    )
    kill_and_restart(stack, "rounds")
    final = wait_state(db, round_id, "published", timeout_s=240)
    print(f"[restart-test] round published after {time.monotonic() - started:.1f}s", flush=True)

    # --- nothing lost, nothing twice --------------------------------------------------
    r = rounds.GetRound(rounds_pb2.GetRoundRequest(round_id=round_id))
    assert r.state == "published", r.message
    tasks = _tasks(db, round_id)
    assert len(tasks) == SAMPLE, "tasks appeared after the selection"
    assert all(t["state"] == "done" for t in tasks), [t for t in tasks if t["state"] != "done"]
    assert dict(r.tasks_by_state) == {"done": SAMPLE}
    with db.connection() as conn:
        per_task = conn.execute(
            """SELECT t.id, count(rv.id) AS n FROM review_tasks t
                 LEFT JOIN reviews rv ON rv.task_id = t.id
                WHERE t.round_id = %s GROUP BY t.id""",
            (round_id,),
        ).fetchall()
        tokens = {
            str(row["lease_token"]): row
            for row in conn.execute(
                """SELECT rv.lease_token, rv.task_id, u.name FROM reviews rv
                     JOIN users u ON u.id = rv.reviewer_id
                     JOIN review_tasks t ON t.id = rv.task_id WHERE t.round_id = %s""",
                (round_id,),
            )
        }
        answered_by = {(row["task_id"], row["name"]) for row in tokens.values()}
        labels = conn.execute(
            "SELECT cell_id, class_code, task_id, source FROM labels WHERE round_id = %s",
            (round_id,),
        ).fetchall()
        label_writes = conn.execute(
            """SELECT entity_id, count(*) AS n FROM audit_log
                WHERE action LIKE 'label.%%' AND (after->>'round_id')::bigint = %s
                GROUP BY entity_id""",
            (round_id,),
        ).fetchall()
        jobs = conn.execute(
            "SELECT * FROM training_jobs WHERE round_id = %s", (round_id,)
        ).fetchall()
        versions = conn.execute(
            "SELECT version, state FROM model_versions WHERE round_id = %s", (round_id,)
        ).fetchall()
    # Every task exactly one review (CST and AL need one answer); no adjudication.
    assert all(row["n"] == 1 for row in per_task), [row for row in per_task if row["n"] != 1]
    # No acknowledged answer lost: the hand-held leases and every simulated submit.
    assert set(acknowledged) <= set(tokens)
    sim_answers = {(a["task_id"], a["reviewer"]) for a in stats.answers}
    assert sim_answers <= answered_by, sim_answers - answered_by
    assert len(sim_answers) + len(acknowledged) == SAMPLE
    # One label per task, the true class, written once.
    by_task = {t["id"]: t for t in tasks}
    assert len(labels) == SAMPLE == r.labels_added == sum(r.labels_added_by_class.values())
    assert {lb["task_id"] for lb in labels} == set(by_task)
    for lb in labels:
        assert by_task[lb["task_id"]]["cell_id"] == lb["cell_id"]
        assert lb["class_code"] == truth.truth(lb["cell_id"])
        assert lb["source"] == by_task[lb["task_id"]]["kind"]
    assert len(label_writes) == SAMPLE and all(w["n"] == 1 for w in label_writes)
    # One training job, resumed after the kill, each epoch once in its history.
    assert len(jobs) == 1, [(j["id"], j["state"]) for j in jobs]
    job = jobs[0]
    # "published" is the trainer's word for "promoted": a gate-rejected version is not.
    assert job["state"] == "succeeded", job["message"]
    assert job["published"] == r.promoted, (job["message"], r.message)
    history = job["history"]
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1)), history
    assert runner.worker_pids(store, job["id"])[0]["pid"] != worker_pid
    # Resumed from a checkpoint: at most the epoch reported last before the kill again.
    assert history[-1]["start"] >= 1, f"the restarted trainer began anew: {history}"
    first_after = next(h["epoch"] for h in history if h["start"] >= 1)
    assert first_after >= interrupted_at, (first_after, interrupted_at, history)
    # One model version, published once, the one the round reports: activated, or
    # rejected by the promotion gate (a few dozen validation cells make it a coin toss).
    assert len(versions) == 1 and versions[0]["version"] == final["model_out"] == r.model_out
    assert versions[0]["state"] == ("active" if r.promoted else "rejected"), r.message
    assert r.training_job == job["id"]


def _assert_state(db: Database, round_id: int, state: str) -> None:
    r = round_row(db, round_id)
    assert r["state"] == state, (r["state"], r["message"])


def _assert_job_state(db: Database, job_id: str, state: str) -> None:
    with db.connection() as conn:
        row = conn.execute("SELECT state FROM training_jobs WHERE id = %s", (job_id,)).fetchone()
    assert row["state"] == state


def _tasks(db: Database, round_id: int) -> list[dict]:
    with db.connection() as conn:
        return conn.execute(
            "SELECT id, cell_id, kind, state FROM review_tasks WHERE round_id = %s ORDER BY id",
            (round_id,),
        ).fetchall()


def _reviews(db: Database, round_id: int) -> int:
    return scalar(
        db,
        "SELECT count(*) AS n FROM reviews rv JOIN review_tasks t ON t.id = rv.task_id "
        "WHERE t.round_id = %s",
        round_id,
    )


def _job(db: Database, round_id: int, ready: Callable[[dict], bool]) -> dict | None:
    with db.connection() as conn:
        rows = conn.execute(
            "SELECT * FROM training_jobs WHERE round_id = %s", (round_id,)
        ).fetchall()
    return next((j for j in rows if ready(j)), None)
