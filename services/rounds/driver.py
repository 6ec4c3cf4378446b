"""Drive every live round through its states, one idempotent step at a time.

    bootstrap: created -> selecting -> reviewing (waves of initial/test tasks until
               every class has its quota) -> training -> evaluating -> published
               (or failed when the initial model misses the 0.80 validation gate)
    others:    created -> predicting -> reviewing -> training -> evaluating -> published

Each step reads the round's state, does work that is safe to repeat (selection and
training are idempotent per round in their services; waves and splits are guarded
by unique keys and by the state they move from), then records the next state. A
driver that crashes mid-step repeats that step when it (or another replica) comes
back. A session-level advisory lock per round keeps two replicas off the same round.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from bmcell import log
from bmcell.db import Database
from bmcell.selection import sample_pool
from bmcell.taxonomy import DEFAULT_TAXONOMY
from bmcell.trainset import LabelledCell, validation_split
from services.rounds import store

_LOG = log.get(__name__)
_LOCK_CLASS = 0x726F  # "ro": advisory-lock namespace for rounds

BOOTSTRAP_DEFAULTS = {
    "initial_per_class": 25,
    "validation_per_class": 50,
    "test_per_class": 50,
    "initial_reviews": 2,
    "test_reviews": 3,
    "wave_size": 600,
    "max_waves": 12,
    "gate": 0.80,
    "seed": 0,
}


@dataclass(frozen=True)
class Job:
    job_id: str
    state: str  # queued, running, succeeded, failed, cancelled
    model_version: int
    message: str


@dataclass
class Ports:
    """What the driver asks of other services (gRPC in production, fakes nowhere)."""

    select: Callable[[int, str, dict], None]
    start_training: Callable[[int, int], str]
    get_job: Callable[[str], Job]


class RoundDriver:
    def __init__(self, db: Database, ports: Ports, model_name: str) -> None:
        self.db = db
        self.ports = ports
        self.model_name = model_name

    def tick(self) -> None:
        """Advance every live round by at most one step."""
        with self.db.connection() as conn:
            ids = store.live_round_ids(conn)
        for round_id in ids:
            self.advance(round_id)

    def advance(self, round_id: int) -> None:
        with self.db.connection() as lock_conn:
            got = lock_conn.execute(
                "SELECT pg_try_advisory_lock(%s, %s) AS ok", (_LOCK_CLASS, round_id)
            ).fetchone()["ok"]
            if not got:
                return
            try:
                self._step(round_id)
            except Exception as exc:  # a step failing is the round's news, not the driver's end
                if _is_transient(exc):
                    # A dependency restarting: one line per tick, no traceback; the
                    # step is retried on the next tick.
                    _LOG.warning(
                        "round step waits for a dependency",
                        round_id=round_id,
                        error=f"{type(exc).__name__}: {exc}",
                    )
                else:
                    _LOG.exception("round step failed", round_id=round_id)
                    with self.db.transaction() as conn:
                        state = store.get(conn, round_id)["state"]
                        store.set_state(conn, round_id, "failed", f"{state} failed: {exc}")
            finally:
                lock_conn.execute("SELECT pg_advisory_unlock(%s, %s)", (_LOCK_CLASS, round_id))

    def _step(self, round_id: int) -> None:
        with self.db.connection() as conn:
            r = store.get(conn, round_id)
        state, bootstrap = r["state"], r["strategy"] == "bootstrap"
        if state == "created":
            self._set(round_id, "selecting" if bootstrap else "predicting", model_in=self._active())
        elif state == "predicting":
            self.ports.select(round_id, r["strategy"], r["params"].get("selection", {}))
            self._set(round_id, "reviewing")
        elif state == "selecting":
            self._bootstrap_wave(r)
            self._set(round_id, "reviewing")
        elif state == "reviewing":
            self._reviewing(r, bootstrap)
        elif state == "training":
            self._training(r)
        elif state == "evaluating":
            self._evaluating(r, bootstrap)

    def _set(self, round_id: int, state: str, message: str | None = None, **cols: object) -> None:
        with self.db.transaction() as conn:
            store.set_state(conn, round_id, state, message, **cols)
        _LOG.info("round state", round_id=round_id, state=state, message=message)

    def _active(self) -> int | None:
        with self.db.connection() as conn:
            return store.active_version(conn, self.model_name)

    # --- reviewing ---------------------------------------------------------------------
    def _reviewing(self, r: dict, bootstrap: bool) -> None:
        params = r["params"]
        with self.db.connection() as conn:
            counts = store.task_counts(conn, r["id"])
        waiting = counts.get("open", 0) + counts.get("leased", 0)
        total = sum(counts.values())
        answered = total - waiting - counts.get("cancelled", 0)
        quorum = float(params.get("review_quorum") or 0)
        deadline = float(params.get("review_deadline_s") or 0)
        age = time.time() - r["updated_at"].timestamp()
        if (
            waiting
            and not (quorum and total and answered / total >= quorum)
            and not (deadline and age >= deadline)
        ):
            return
        if waiting:
            with self.db.transaction() as conn:
                n = store.cancel_open_tasks(conn, r["id"])
            _LOG.info("review closed early", round_id=r["id"], cancelled=n)
        if bootstrap and not self._bootstrap_done(r):
            self._bootstrap_wave(r)
            with self.db.transaction() as conn:
                # Touch updated_at: the review deadline counts from the newest wave.
                store.set_state(conn, r["id"], "reviewing")
            return
        if bootstrap:
            with self.db.connection() as conn:
                labelled = sum(store.label_counts(conn, ("initial",)).values())
            if not labelled:
                self._set(r["id"], "failed", "no initial labels: upload specimens, then bootstrap")
                return
            self._assign_validation(r)
        self._set(r["id"], "training")

    # --- bootstrap ---------------------------------------------------------------------
    def _bootstrap_params(self, r: dict) -> dict:
        return {**BOOTSTRAP_DEFAULTS, **{k: v for k, v in r["params"].items() if v}}

    def _quotas(self, p: dict) -> tuple[dict[str, int], dict[str, int]]:
        """Labels wanted per training class (initial + its share of validation), and per
        evaluation class of the test specimens."""
        merge = DEFAULT_TAXONOMY.eval_merge
        train = {}
        for code in DEFAULT_TAXONOMY.codes:
            members = sum(
                1 for c in DEFAULT_TAXONOMY.codes if merge.get(c, c) == merge.get(code, code)
            )
            train[code] = p["initial_per_class"] + -(-p["validation_per_class"] // members)
        test = {e: p["test_per_class"] for e in DEFAULT_TAXONOMY.eval_codes}
        return train, test

    def _bootstrap_done(self, r: dict) -> bool:
        p = self._bootstrap_params(r)
        want_train, want_test = self._quotas(p)
        with self.db.connection() as conn:
            have_train = store.label_counts(conn, ("initial", "validation"))
            have_test_raw = store.label_counts(conn, ("test",))
            waves = conn.execute(
                # A wave's tasks share their transaction's timestamp; adjudications
                # (created one at a time) are not waves.
                "SELECT count(DISTINCT created_at) AS n FROM review_tasks "
                "WHERE round_id = %s AND kind IN ('initial', 'test')",
                (r["id"],),
            ).fetchone()["n"]
            pool_left = {
                t: store.pool(conn, test=t, labs=p.get("labs") or []).size for t in (False, True)
            }
        merge = DEFAULT_TAXONOMY.eval_merge
        have_test: dict[str, int] = {}
        for code, n in have_test_raw.items():
            have_test[merge.get(code, code)] = have_test.get(merge.get(code, code), 0) + n
        short_train = [c for c, n in want_train.items() if have_train.get(c, 0) < n]
        short_test = [c for c, n in want_test.items() if have_test.get(c, 0) < n]
        if not short_train and not short_test:
            return True
        if waves >= p["max_waves"] or (
            (not short_train or pool_left[False] == 0) and (not short_test or pool_left[True] == 0)
        ):
            _LOG.warning(
                "bootstrap stops short of its quotas",
                round_id=r["id"],
                short_train=short_train,
                short_test=short_test,
            )
            return True
        return False

    def _bootstrap_wave(self, r: dict) -> None:
        """Another batch of random cells for reviewers: training specimens as 'initial',
        test specimens as 'test' (never used for training)."""
        p = self._bootstrap_params(r)
        labs = p.get("labs") or []
        with self.db.transaction() as conn:
            done = conn.execute(
                "SELECT count(*) AS n FROM review_tasks WHERE round_id = %s", (r["id"],)
            ).fetchone()["n"]
            seed = int(p["seed"]) * 1_000_003 + done
            train_pool = store.pool(conn, test=False, labs=labs)
            test_pool = store.pool(conn, test=True, labs=labs)
            train = sample_pool(train_pool, int(p["wave_size"]), seed)
            test = sample_pool(test_pool, int(p["wave_size"]) // 2, seed + 1)
            store.insert_bootstrap_tasks(
                conn, r["id"], "initial", train.tolist(), int(p["initial_reviews"])
            )
            store.insert_bootstrap_tasks(
                conn, r["id"], "test", test.tolist(), int(p["test_reviews"])
            )
        _LOG.info("bootstrap wave", round_id=r["id"], initial=len(train), test=len(test))

    def _assign_validation(self, r: dict) -> None:
        p = self._bootstrap_params(r)
        with self.db.transaction() as conn:
            if conn.execute("SELECT 1 FROM labels WHERE source = 'validation' LIMIT 1").fetchone():
                return  # the split is fixed once and never reshuffled
            rows = store.bootstrap_labels(conn, r["id"])
            cells = [
                LabelledCell(
                    cell_id=row["cell_id"],
                    class_code=row["class_code"],
                    round_added=0,
                    source="initial",
                    specimen_id=0,
                    is_test_specimen=False,
                )
                for row in rows
            ]
            chosen = validation_split(
                cells,
                per_class=int(p["validation_per_class"]),
                seed=int(p["seed"]),
                eval_merge=DEFAULT_TAXONOMY.eval_merge,
            )
            store.move_to_validation(conn, [int(c) for c in chosen])

    # --- training and publishing -------------------------------------------------------
    def _training(self, r: dict) -> None:
        params = r["params"]
        with self.db.connection() as conn:
            done = store.succeeded_job(conn, r["id"])
        job_id = (
            done["id"]
            if done
            else self.ports.start_training(r["id"], int(params.get("epochs") or 0))
        )
        job = self.ports.get_job(job_id)
        if job.state in ("queued", "running"):
            return
        if job.state != "succeeded":
            self._set(r["id"], "failed", f"training job {job_id} {job.state}: {job.message}")
            return
        self._set(
            r["id"],
            "evaluating",
            model_out=job.model_version,
            params={**params, "training_job": job_id},
        )

    def _evaluating(self, r: dict, bootstrap: bool) -> None:
        with self.db.connection() as conn:
            mv = store.model_version(conn, self.model_name, r["model_out"] or 0)
        if mv is None:
            self._set(r["id"], "failed", f"model version {r['model_out']} is not registered")
            return
        val = mv["validation_accuracy"] or 0.0
        if bootstrap:
            gate = float(self._bootstrap_params(r)["gate"])
            if val < gate:
                self._set(
                    r["id"],
                    "failed",
                    f"initial model validation accuracy {val:.3f} < gate {gate:.2f}: "
                    "label more initial cells and bootstrap again",
                )
                return
        promoted = mv["state"] == "active"
        note = f"v{mv['version']} validation {val:.3f}, test {mv['test_accuracy'] or 0:.3f}; " + (
            "promoted" if promoted else f"not promoted: {mv['note']}"
        )
        self._set(r["id"], "published", note)


def _is_transient(exc: Exception) -> bool:
    """Unavailable services and lost connections: retry on the next tick."""
    from bmcell.errors import Unavailable

    return isinstance(exc, Unavailable | psycopg.OperationalError | TimeoutError | ConnectionError)


def run_forever(driver: RoundDriver, interval_s: float, stop) -> None:
    while not stop.is_set():
        try:
            driver.tick()
        except Exception:
            _LOG.exception("round driver tick failed")
        stop.wait(interval_s)
