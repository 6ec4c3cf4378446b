"""Training jobs' lifecycle in the trainer process (the Ray driver).

StartTraining writes a queued job with its plan and starts a background thread that
drives it: Ray Train run, progress into the job row and the training metrics,
then evaluation and publishing. At process start every job left ``queued`` or
``running`` in Postgres (the process that drove it died) is driven again; its Ray
Train run resumes from the last checkpoint in object storage, so finished epochs
are not trained again. One trainer process drives a job; running several trainer
replicas needs a per-job lease, which this version does not take.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from bmcell import log
from bmcell.errors import BmcellError
from bmcell.metrics import (
    MODEL_ACCURACY,
    TRAINING_ACCURACY,
    TRAINING_EPOCH,
    TRAINING_EPOCH_SECONDS,
    TRAINING_EPOCHS_PLANNED,
    TRAINING_JOBS,
    TRAINING_JOBS_FINISHED,
    TRAINING_LOSS,
    TRAINING_SAMPLES_PER_SECOND,
)
from bmcell.runtime import Runtime
from bmcell.settings import TrainerSettings
from bmcell.training_progress import epoch_line
from services.trainer import jobs, runner
from services.trainer.plan import Overrides, Plan, make_plan
from services.trainer.publish import publish

_LOG = log.get(__name__)


class JobManager:
    def __init__(self, rt: Runtime[TrainerSettings], activate: Callable[[int], None]) -> None:
        self.rt = rt
        self.activate = activate
        self._lock = threading.Lock()
        self._threads: dict[str, threading.Thread] = {}

    # --- requests ----------------------------------------------------------------------
    def start(self, round_id: int | None, overrides: Overrides) -> dict:
        db = self.rt.db
        if round_id is not None and (live := jobs.live_for_round(db, round_id)) is not None:
            return live
        plan = make_plan(db, self.rt.store, self.rt.settings, round_id, overrides)
        row = jobs.create(db, round_id, plan.to_json(), plan.epochs)
        if row["state"] == "queued" and row["epoch"] == 0:
            self._drive(row["id"])
        self._count_states()
        return row

    def cancel(self, job_id: str) -> dict:
        row = jobs.cancel(self.rt.db, job_id)
        if row["state"] == "cancelled":
            runner.request_cancel(self.rt.store, job_id)
        self._count_states()
        return row

    def resume_all(self) -> list[str]:
        """Drive every live job again (called once at process start)."""
        ids = [row["id"] for row in jobs.live_jobs(self.rt.db)]
        for job_id in ids:
            _LOG.info("resuming training job left live by an earlier process", job_id=job_id)
            self._drive(job_id)
        self._count_states()
        return ids

    def wait_all(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for thread in list(self._threads.values()):
            thread.join(max(0.0, deadline - time.monotonic()))

    # --- driving a job -----------------------------------------------------------------
    def _drive(self, job_id: str) -> None:
        with self._lock:
            thread = self._threads.get(job_id)
            if thread is not None and thread.is_alive():
                return
            thread = threading.Thread(
                target=self._run, args=(job_id,), name=f"job-{job_id}", daemon=True
            )
            self._threads[job_id] = thread
            thread.start()

    def _run(self, job_id: str) -> None:
        db, store, settings = self.rt.db, self.rt.store, self.rt.settings
        row = jobs.get(db, job_id)
        plan = Plan.from_json(row["config"])
        model = plan.model_name
        if jobs.update(db, job_id, state="running", message="reading the cells' inputs") is None:
            return
        self._count_states()
        TRAINING_EPOCHS_PLANNED.labels(model).set(plan.epochs)

        observed = {h["epoch"] for h in row["history"] or []}  # by an earlier process

        def on_progress(progress: dict | None) -> bool:
            if progress:
                last = progress["history"][-1]
                jobs.update(
                    db,
                    job_id,
                    epoch=progress["epoch"],
                    history=progress["history"],
                    message=epoch_line(
                        last["epoch"],
                        plan.epochs,
                        last["loss"],
                        last["validation_accuracy"],
                        last.get("seconds", 0.0),
                        last["samples_per_second"],
                    ),
                )
                TRAINING_EPOCH.labels(model).set(progress["epoch"])
                TRAINING_LOSS.labels(model).set(last["loss"])
                TRAINING_ACCURACY.labels(model).set(last["validation_accuracy"])
                TRAINING_SAMPLES_PER_SECOND.labels(model).set(last["samples_per_second"])
                # Every epoch once, also those finished between two polls.
                for h in progress["history"]:
                    if h["epoch"] not in observed and "seconds" in h:
                        TRAINING_EPOCH_SECONDS.labels(model).observe(h["seconds"])
                        observed.add(h["epoch"])
            return jobs.get(db, job_id)["state"] not in jobs.LIVE

        try:
            inputs = runner.training_inputs(db, store, plan)
            jobs.update(db, job_id, message="training")
            state = runner.run(job_id, plan, settings, store, on_progress, inputs)
            if jobs.get(db, job_id)["state"] not in jobs.LIVE:
                self._finished(job_id, "cancelled")
                return
            jobs.update(
                db,
                job_id,
                epoch=state["epoch"],
                history=state["history"],
                message="evaluating and publishing",
            )
            outcome = publish(
                db,
                store,
                job_id,
                plan,
                (state.get("best") or state)["model"],
                state["history"],
                self.activate,
            )
        except Exception as exc:
            _LOG.exception("training job failed", job_id=job_id)
            detail = str(exc) if isinstance(exc, BmcellError) else f"{type(exc).__name__}: {exc}"
            jobs.update(db, job_id, state="failed", message=detail.splitlines()[0][:500])
            self._finished(job_id, "failed")
            return
        jobs.update(
            db,
            job_id,
            state="succeeded",
            model_version=outcome.version,
            published=outcome.published,
            message=outcome.message,
        )
        if outcome.published:
            MODEL_ACCURACY.labels(model, "validation").set(outcome.validation_accuracy)
            if outcome.test_accuracy is not None:
                MODEL_ACCURACY.labels(model, "test").set(outcome.test_accuracy)
        self._finished(job_id, "succeeded")

    def _finished(self, job_id: str, state: str) -> None:
        TRAINING_JOBS_FINISHED.labels(state).inc()
        self._count_states()
        _LOG.info("training job ended", job_id=job_id, state=state)

    def _count_states(self) -> None:
        counts = jobs.counts_by_state(self.rt.db)
        for state in (*jobs.LIVE, *jobs.FINAL):
            TRAINING_JOBS.labels(state).set(counts.get(state, 0))
