"""Run a plan on the Ray cluster with Ray Train (V2, Ray's default) and follow it.

The run is a ``TorchTrainer`` named after the job, with its storage on the S3
server (``<data_bucket>/checkpoints/<job id>/``, through pyarrow's S3 filesystem).
That name is what makes a job resumable across trainer processes: Ray Train V2
keeps a snapshot of the run's checkpoints in that folder, and a new ``fit()`` under
the same name and storage continues from the latest one (``get_checkpoint`` in
``loop.train_loop``). Within one run, ``FailureConfig(max_failures)`` restarts the
worker group from the latest checkpoint after a worker dies.

The cells' inputs travel once: the caller hands ``run`` the uint8 thumbs of the
training then validation cells (:func:`training_inputs`), ``run`` writes them as one
``.npy`` under the job's control folder, and every worker reads that one object at
start. No worker reads a crop or the database.

``fit()`` blocks, so it runs in a thread of its own while the caller's thread reads
the progress object the workers write and hands each new epoch to ``on_progress``.
"""

from __future__ import annotations

import io
import json
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow.fs

from bmcell import log, thumbs
from bmcell.db import Database
from bmcell.errors import NotFound, Unavailable
from bmcell.settings import TrainerSettings
from bmcell.storage import ObjectStore
from services.trainer.loop import LoopConfig, load_checkpoint_state, train_loop
from services.trainer.plan import Plan

_LOG = log.get(__name__)
_RAY_LOCK = threading.Lock()


def control_prefix(job_id: str) -> str:
    """Object-storage folder of a job's progress, worker pids and cancel request."""
    return f"training-jobs/{job_id}"


def inputs_key(job_id: str) -> str:
    """The job's packed inputs (uint8 thumbs of its training, then validation cells)."""
    return f"{control_prefix(job_id)}/inputs.npy"


def training_inputs(db: Database, store: ObjectStore, plan: Plan) -> np.ndarray:
    """The thumbs of the plan's training then validation cells, in plan order: one query
    (``thumbs.fetch``; a cell without a thumb at this size gets one from its crop)."""
    cells = [cell for _, _, cell in (*plan.train, *plan.validation)]
    return thumbs.fetch(db, store, cells, plan.input_size)


def stage_inputs(store: ObjectStore, job_id: str, pixels: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(pixels), allow_pickle=False)
    key = inputs_key(job_id)
    store.put(key, buf.getvalue(), "application/octet-stream")
    return key


def s3_options(settings: TrainerSettings) -> dict[str, Any]:
    return {
        "s3_endpoint": settings.s3_endpoint,
        "s3_access_key": settings.s3_access_key.get_secret_value(),
        "s3_secret_key": settings.s3_secret_key.get_secret_value(),
        "s3_secure": settings.s3_secure,
        # Workers verify the store with the same CA file (same path on every node).
        "tls": settings.tls,
        "tls_ca": str(settings.tls_ca) if settings.tls_ca else None,
        "s3_region": settings.s3_region,
        "data_bucket": settings.data_bucket,
        "models_bucket": settings.models_bucket,
    }


def storage_filesystem(settings: TrainerSettings) -> pyarrow.fs.S3FileSystem:
    return pyarrow.fs.S3FileSystem(
        access_key=settings.s3_access_key.get_secret_value(),
        secret_key=settings.s3_secret_key.get_secret_value(),
        endpoint_override=settings.s3_endpoint,
        scheme="https" if settings.s3_secure else "http",
        region=settings.s3_region,
    )


def ensure_ray(address: str) -> None:
    import ray

    with _RAY_LOCK:
        if ray.is_initialized():
            return
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        except Exception as exc:  # ConnectionError and Ray's own types
            raise Unavailable(
                "the Ray cluster at BMCELL_RAY_ADDRESS is unreachable", detail=f"{address}: {exc}"
            ) from exc


def loop_config(job_id: str, plan: Plan, settings: TrainerSettings) -> LoopConfig:
    return LoopConfig(
        job_id=job_id,
        prefix=control_prefix(job_id),
        s3=s3_options(settings),
        inputs_key=inputs_key(job_id),
        train_labels=[c for _, c, _ in plan.train],
        validation_labels=[c for _, c, _ in plan.validation],
        num_classes=len(plan.taxonomy["classes"]),
        input_size=plan.input_size,
        epochs=plan.epochs,
        batch_size=plan.batch_size,
        learning_rate=plan.learning_rate,
        momentum=plan.momentum,
        class_weights=plan.class_weights,
        init_state_key=plan.init_state_key,
        seed=plan.seed,
        threads=max(1, int(plan.cpus_per_worker)),
        eval_index_map=plan.tax.eval_index_map(),
    )


def run(
    job_id: str,
    plan: Plan,
    settings: TrainerSettings,
    store: ObjectStore,
    on_progress: Callable[[dict | None], bool],
    inputs: np.ndarray,
) -> dict:
    """Train to the end (or a cancel); returns the last checkpoint's state.

    ``inputs`` are the uint8 ``(N, S, S, 3)`` inputs of ``plan.train`` then
    ``plan.validation`` (:func:`training_inputs`).
    ``on_progress`` is called every ``progress_poll_s`` with the workers' progress
    (epoch, history, starts) when a new epoch finished, else None; it returns True to
    ask the workers to stop after their current epoch.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    expected = (len(plan.train) + len(plan.validation), plan.input_size, plan.input_size, 3)
    if inputs.shape != expected or inputs.dtype != np.uint8:
        raise ValueError(f"inputs must be uint8 {expected}, got {inputs.dtype} {inputs.shape}")
    ensure_ray(settings.ray_address)
    # Written again by a resumed job: the plan, hence the cells and their thumbs, are fixed.
    stage_inputs(store, job_id, inputs)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config(job_id, plan, settings).to_dict(),
        scaling_config=ScalingConfig(
            num_workers=plan.num_workers, resources_per_worker={"CPU": plan.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=job_id,
            storage_path=f"{settings.data_bucket}/checkpoints",
            storage_filesystem=storage_filesystem(settings),
            failure_config=FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=settings.checkpoints_to_keep),
        ),
    )
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the caller's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name=f"fit-{job_id}", daemon=True)
    thread.start()
    seen_epoch = -1
    cancel_sent = False
    while True:
        thread.join(settings.progress_poll_s)
        progress = read_progress(store, job_id)
        fresh = progress if progress is not None and progress["epoch"] != seen_epoch else None
        if fresh is not None:
            seen_epoch = fresh["epoch"]
        if on_progress(fresh) and not cancel_sent:
            request_cancel(store, job_id)
            cancel_sent = True
        if not thread.is_alive():
            break
    store.delete(inputs_key(job_id))  # the run is over; a resumed job stages them again
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {job_id} ended without a checkpoint")
    with tempfile.TemporaryDirectory(prefix=f"bmcell-{job_id}-") as d:
        local = result.checkpoint.to_directory(d)
        state = load_checkpoint_state(local)
    # The last epoch's checkpoint and wall seconds were measured after its checkpoint
    # was taken; progress.json, written after, has them.
    progress = read_progress(store, job_id)
    if progress is not None and progress["epoch"] == state["epoch"]:
        state["history"] = progress["history"]
    return state


def read_progress(store: ObjectStore, job_id: str) -> dict | None:
    try:
        return json.loads(store.get(f"{control_prefix(job_id)}/progress.json"))
    except NotFound:
        return None


def request_cancel(store: ObjectStore, job_id: str) -> None:
    store.put(f"{control_prefix(job_id)}/cancel", b"cancel", "text/plain")


def worker_pids(store: ObjectStore, job_id: str) -> dict[int, dict]:
    """The pid files of the job's current workers, by rank (tests kill one)."""
    out = {}
    for key in store.list(f"{control_prefix(job_id)}/workers/"):
        info = json.loads(store.get(key))
        out[int(info["rank"])] = info
    return out
