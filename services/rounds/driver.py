"""Drive every live round through its states, one idempotent step at a time.

    bootstrap: created -> selecting -> reviewing (waves of initial/test tasks until
               every class has its quota) -> training -> evaluating -> published
               (or failed when the initial model misses the 0.80 validation gate)
    others:    created -> predicting -> reviewing -> training -> evaluating -> published
               (predicting -> published "nothing to add" when the pool is empty)

Each step reads the round's state, does work that is safe to repeat (selection and
training are idempotent per round in their services; a wave and the state change it
causes commit in one transaction, numbered on the round), then records the next
state. A driver that crashes mid-step repeats that step when it (or another replica)
comes back. A session-level advisory lock per round keeps two replicas off the same
round; it is held on a connection of its own, outside the pool and outside any
transaction, so a step waiting on a remote call (a selection may take 30 minutes)
holds no pooled connection. Live rounds advance concurrently, one worker each, so
one round's long step never stalls another.

A failed step ends the round ``failed`` with the step recorded: a failed or cancelled
training job is never restarted by itself; RetryRound starts the round again there.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import psycopg

from bmcell import log
from bmcell.db import Database
from bmcell.errors import Unavailable
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


@dataclass(frozen=True)
class Selected:
    """What a round's selection found: the pool in scope, the sample drawn from it."""

    pool_size: int
    sample_size: int


@dataclass
class Ports:
    """What the driver asks of other services (gRPC in production, fakes nowhere)."""

    select: Callable[[int, str, dict], Selected]
    start_training: Callable[[int, int], str]
    get_job: Callable[[str], Job]


def bootstrap_params(params: dict) -> dict:
    """A bootstrap round's settings: its own, else the defaults. The seed is the one
    given with the round's selection parameters (``StartRoundRequest.selection.seed``)."""
    p = {**BOOTSTRAP_DEFAULTS, **{k: v for k, v in params.items() if v}}
    seed = (params.get("selection") or {}).get("seed")
    if seed is not None:
        p["seed"] = int(seed)  # MessageToDict writes int64 as a string
    return p


def wave_sample(
    train_pool: np.ndarray,
    test_pool: np.ndarray,
    *,
    seed: int,
    wave: int,
    size: int,
    want_train: bool,
    want_test: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """One bootstrap wave: up to ``size`` random training cells and ``size // 2`` test
    cells, drawn only where a class is still short. The draw is a function of the
    round's seed and the wave's number alone (and the pools)."""
    base = seed * 1_000_003 + 2 * wave
    empty = np.empty(0, dtype=np.int64)
    train = sample_pool(train_pool, size, base) if want_train else empty
    test = sample_pool(test_pool, size // 2, base + 1) if want_test else empty
    return train, test


def quotas(p: dict) -> tuple[dict[str, int], dict[str, int]]:
    """Labels wanted per training class (initial + its share of validation), and per
    evaluation class of the test specimens."""
    merge = DEFAULT_TAXONOMY.eval_merge
    train = {}
    for code in DEFAULT_TAXONOMY.codes:
        members = sum(1 for c in DEFAULT_TAXONOMY.codes if merge.get(c, c) == merge.get(code, code))
        train[code] = int(p["initial_per_class"]) + -(-int(p["validation_per_class"]) // members)
    test = {e: int(p["test_per_class"]) for e in DEFAULT_TAXONOMY.eval_codes}
    return train, test


def shortfalls(
    p: dict, have_train: dict[str, int], have_test: dict[str, int]
) -> tuple[list[str], list[str]]:
    """Training classes and test evaluation classes below their quotas."""
    want_train, want_test = quotas(p)
    merge = DEFAULT_TAXONOMY.eval_merge
    test: dict[str, int] = {}
    for code, n in have_test.items():
        test[merge.get(code, code)] = test.get(merge.get(code, code), 0) + n
    short_train = [c for c, n in want_train.items() if have_train.get(c, 0) < n]
    short_test = [c for c, n in want_test.items() if test.get(c, 0) < n]
    return short_train, short_test


class RoundDriver:
    def __init__(self, db: Database, ports: Ports, model_name: str) -> None:
        self.db = db
        self.ports = ports
        self.model_name = model_name
        self._running: dict[int, threading.Thread] = {}
        self._mutex = threading.Lock()

    def tick(self) -> None:
        """Start a step for every live round that has none running; returns at once.

        One daemon thread per step in progress: a step waiting 30 minutes on a
        selection holds up only its own round, and does not hold up the process's exit.
        """
        with self.db.connection() as conn:
            ids = store.live_round_ids(conn)
        with self._mutex:
            for round_id, thread in list(self._running.items()):
                if not thread.is_alive():
                    del self._running[round_id]
            for round_id in ids:
                if round_id not in self._running:
                    thread = threading.Thread(
                        target=self.advance, args=(round_id,), name=f"round-{round_id}", daemon=True
                    )
                    self._running[round_id] = thread
                    thread.start()

    def wait(self, timeout_s: float | None = None) -> None:
        """Until the steps started so far have ended (tests, shutdown)."""
        with self._mutex:
            running = list(self._running.values())
        for thread in running:
            thread.join(timeout_s)

    def advance(self, round_id: int) -> None:
        try:
            # Not from the pool: this connection is held for the whole step, idle.
            lock_conn = psycopg.connect(self.db.conninfo, autocommit=True)
        except psycopg.OperationalError as exc:
            _LOG.warning("round step waits for the database", round_id=round_id, error=str(exc))
            return
        with lock_conn:
            got = lock_conn.execute(
                "SELECT pg_try_advisory_lock(%s, %s)", (_LOCK_CLASS, round_id)
            ).fetchone()[0]
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
                        store.set_state(
                            conn, round_id, "failed", f"{state} failed: {exc}", failed_step=state
                        )
            finally:
                # Closing the session (the with block) releases the lock in any case.
                with contextlib.suppress(psycopg.Error):
                    lock_conn.execute("SELECT pg_advisory_unlock(%s, %s)", (_LOCK_CLASS, round_id))

    def _step(self, round_id: int) -> None:
        with self.db.connection() as conn:
            r = store.get(conn, round_id)
        state, bootstrap = r["state"], r["strategy"] == "bootstrap"
        if state == "created":
            self._set(round_id, "selecting" if bootstrap else "predicting", model_in=self._active())
        elif state == "predicting":
            self._predicting(r)
        elif state == "selecting":
            self._bootstrap_wave(r, first=True)
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

    def _fail(self, round_id: int, message: str, step: str | None) -> None:
        """``step``: where RetryRound starts again; None where a retry cannot help."""
        self._set(round_id, "failed", message, failed_step=step)

    def _active(self) -> int | None:
        with self.db.connection() as conn:
            return store.active_version(conn, self.model_name)

    # --- predicting --------------------------------------------------------------------
    def _predicting(self, r: dict) -> None:
        # No connection is held here: the selection may take as long as its deadline.
        selected = self.ports.select(r["id"], r["strategy"], r["params"].get("selection", {}))
        if selected.sample_size == 0:
            # Nothing to review, so nothing to train on that the model in force has
            # not seen: the round ends with that model.
            self._set(
                r["id"],
                "published",
                f"nothing to add: the pool of unlabelled cells in scope is empty "
                f"(pool {selected.pool_size}); v{r['model_in'] or 0} stays",
                model_out=r["model_in"],
            )
            return
        self._set(r["id"], "reviewing")

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
        if bootstrap:
            short = self._bootstrap_short(r)
            if short is None:
                self._bootstrap_wave(r, first=False)
                return
            with self.db.connection() as conn:
                labelled = sum(store.label_counts(conn, r["experiment"], ("initial",)).values())
            if not labelled:
                self._fail(r["id"], "no initial labels: upload specimens, then retry", "reviewing")
                return
            self._assign_validation(r)
            if short:
                self._set(
                    r["id"],
                    "training",
                    f"bootstrap stopped short of its quotas for {', '.join(short)}",
                    short_classes=short,
                )
                return
        self._set(r["id"], "training")

    # --- bootstrap ---------------------------------------------------------------------
    def _bootstrap_short(self, r: dict) -> list[str] | None:
        """None while another wave is due; else the classes that stop short of their
        quotas (test evaluation classes as ``test:CODE``), empty when none."""
        p = bootstrap_params(r["params"])
        with self.db.connection() as conn:
            have_train = store.label_counts(conn, r["experiment"], ("initial", "validation"))
            have_test = store.label_counts(conn, r["experiment"], ("test",))
            pool_left = {
                t: store.pool(conn, test=t, labs=p.get("labs") or []).size for t in (False, True)
            }
        short_train, short_test = shortfalls(p, have_train, have_test)
        short = short_train + [f"test:{c}" for c in short_test]
        if not short:
            return []
        if r["waves"] >= int(p["max_waves"]) or (
            (not short_train or pool_left[False] == 0) and (not short_test or pool_left[True] == 0)
        ):
            _LOG.warning(
                "bootstrap stops short of its quotas",
                round_id=r["id"],
                waves=r["waves"],
                short=short,
            )
            return short
        return None

    def _bootstrap_wave(self, r: dict, *, first: bool) -> None:
        """Another batch of random cells for reviewers: training specimens as 'initial',
        test specimens as 'test' (never used for training), where a class is short.
        A round's first wave always labels training cells: a bootstrap started again
        after a missed gate is asked for more initial cells, quotas met or not.
        The wave, its number and the round's move to 'reviewing' commit together."""
        p = bootstrap_params(r["params"])
        labs = p.get("labs") or []
        with self.db.transaction() as conn:
            wave = conn.execute(
                "SELECT waves FROM rounds WHERE id = %s FOR UPDATE", (r["id"],)
            ).fetchone()["waves"]
            short_train, short_test = shortfalls(
                p,
                store.label_counts(conn, r["experiment"], ("initial", "validation")),
                store.label_counts(conn, r["experiment"], ("test",)),
            )
            train, test = wave_sample(
                store.pool(conn, test=False, labs=labs),
                store.pool(conn, test=True, labs=labs),
                seed=int(p["seed"]),
                wave=wave,
                size=int(p["wave_size"]),
                want_train=first or bool(short_train),
                want_test=bool(short_test),
            )
            n_train = store.insert_bootstrap_tasks(
                conn, r["id"], "initial", train.tolist(), int(p["initial_reviews"])
            )
            n_test = store.insert_bootstrap_tasks(
                conn, r["id"], "test", test.tolist(), int(p["test_reviews"])
            )
            # Touches updated_at too: the review deadline counts from the newest wave.
            store.set_state(conn, r["id"], "reviewing", waves=wave + 1)
        _LOG.info("bootstrap wave", round_id=r["id"], wave=wave + 1, initial=n_train, test=n_test)

    def _assign_validation(self, r: dict) -> None:
        p = bootstrap_params(r["params"])
        with self.db.transaction() as conn:
            if store.has_validation_split(conn, r["experiment"]):
                return  # the split is fixed once per experiment and never reshuffled
            rows = store.bootstrap_labels(conn, r["experiment"])
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
                keep_in_training=int(p["initial_per_class"]),
            )
            store.move_to_validation(conn, [int(c) for c in chosen])

    # --- training and publishing -------------------------------------------------------
    def _training(self, r: dict) -> None:
        params = r["params"]
        with self.db.connection() as conn:
            job_row = store.latest_job(conn, r["id"], list(params.get("retried_jobs", [])))
        # Only a round with no job of its own starts one: a failed or cancelled job
        # ends the round below, and only RetryRound sets it aside for a new one.
        job_id = (
            job_row["id"]
            if job_row
            else self.ports.start_training(r["id"], int(params.get("epochs") or 0))
        )
        job = self.ports.get_job(job_id)
        if job.state in ("queued", "running"):
            return
        if job.state != "succeeded":
            self._fail(r["id"], f"training job {job_id} {job.state}: {job.message}", "training")
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
            self._fail(r["id"], f"model version {r['model_out']} is not registered", "evaluating")
            return
        val = mv["validation_accuracy"] or 0.0
        short = f"; short of quota: {', '.join(r['short_classes'])}" if r["short_classes"] else ""
        if bootstrap:
            gate = float(bootstrap_params(r["params"])["gate"])
            if val < gate:
                self._fail(
                    r["id"],
                    f"initial model validation accuracy {val:.3f} < gate {gate:.2f}: "
                    f"label more initial cells and bootstrap again{short}",
                    None,
                )
                return
        promoted = mv["state"] == "active"
        note = f"v{mv['version']} validation {val:.3f}, test {mv['test_accuracy'] or 0:.3f}; " + (
            "promoted" if promoted else f"not promoted: {mv['note']}"
        )
        self._set(r["id"], "published", note + short)


def _is_transient(exc: Exception) -> bool:
    """Unavailable services and lost connections: retry on the next tick."""
    return isinstance(exc, Unavailable | psycopg.OperationalError | TimeoutError | ConnectionError)


def run_forever(driver: RoundDriver, interval_s: float, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            driver.tick()
        except Exception:
            _LOG.exception("round driver tick failed")
        stop.wait(interval_s)
