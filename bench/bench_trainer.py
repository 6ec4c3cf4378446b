"""Trainer: Ray Train with 2 workers against plain PyTorch, on the same cells.

Both arms train ``CellClassifier`` at the trainer's input size on the cells the
segmenter cut from the bench's uploads (labels: ``cell_id mod classes``; speed
does not depend on them), with the trainer's augmentation, lr schedule, BatchNorm
recalibration and validation on a tenth of the cells, a checkpoint to object
storage every epoch.

- ``ray 2 workers``: the trainer's own code path, ``services.trainer.runner.run``
  (Ray Train V2, DDP on gloo, one CPU and one intra-op thread a worker, batch
  ``BMCELL_BATCH_SIZE`` per worker, checkpoints to the S3 server).
- ``plain``: one process, the same threads budget (2 intra-op threads), the same
  global batch (2 x the per-worker batch, so the same optimiser steps an epoch), the
  cells' thumbs read with ``bmcell.thumbs`` at the first epoch, a ``torch.save``
  checkpoint put to object storage after every epoch.

An item is a training sample, augmentation included; the rate is the median
samples/s over the epochs after the first (the first also reads the cells).
``epoch_s`` is the median wall time of those epochs including validation and the
checkpoint: for Ray, the time between the progress records the workers write after
each epoch's checkpoint (polled every 0.1 s). A pass is one training run of ``E``
epochs, ``E`` chosen from a timed plain epoch so a run lasts about ``--seconds``;
the Ray pass's CPU includes its start and end (workers, the Train controller).
"""

from __future__ import annotations

import inspect
import io
import math
import time
import uuid

import numpy as np
import torch
import torch.nn.functional as F

from bench import flops
from bench.context import BenchStack
from bench.harness import Arm, ArmResult, CpuMeter, Sample, median, run_alternated
from bmcell import thumbs, trainset
from bmcell.network import CellClassifier
from bmcell.settings import TrainerSettings, load
from bmcell.taxonomy import DEFAULT_TAXONOMY
from services.trainer import loop, runner
from services.trainer.augment import AugmentParams, augment, seeded_generator
from services.trainer.plan import Plan

NAME = "trainer"
WORKERS = 2
SEED = 1


def make_plan(settings: TrainerSettings, cells: list, epochs: int) -> Plan:
    n_val = max(WORKERS, len(cells) // 10)
    items = [(c.crop_key, c.cell_id % DEFAULT_TAXONOMY.num_classes, c.cell_id) for c in cells]
    train, validation = items[n_val:], items[:n_val]
    counts = np.bincount([k for _, k, _ in train], minlength=DEFAULT_TAXONOMY.num_classes)
    return Plan(
        round_id=None,
        round_number=1,
        model_name="bench",
        taxonomy=DEFAULT_TAXONOMY.to_json(),
        input_size=settings.input_size,
        epochs=epochs,
        num_workers=WORKERS,
        cpus_per_worker=1.0,
        learning_rate=settings.learning_rate_first,
        momentum=settings.momentum,
        batch_size=settings.batch_size,
        per_class_cap=settings.per_class_cap,
        max_accuracy_drop=settings.max_accuracy_drop,
        seed=SEED,
        init_version=None,
        init_state_key=None,
        class_weights=trainset.class_weights(counts).tolist(),
        train=train,
        validation=validation,
    )


def _as_input(x: torch.Tensor) -> torch.Tensor:
    """The network's input as the workers make it: ``loop.as_input`` (channels_last)
    where the trainer has one, else the batch as it is."""
    as_input = getattr(loop, "as_input", None)
    return as_input(x) if as_input is not None else x


def plain_run(ctx: BenchStack, plan: Plan, threads: int) -> list[dict]:
    """The worker loop's work in one process, without Ray: per-epoch records."""
    torch.set_num_threads(threads)
    batch = plan.batch_size * plan.num_workers
    model = CellClassifier(DEFAULT_TAXONOMY.num_classes)
    if hasattr(loop, "as_input"):
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=plan.learning_rate, momentum=plan.momentum)
    weights = torch.tensor(plan.class_weights, dtype=torch.float32)
    labels = torch.tensor([k for _, k, _ in plan.train])
    val_labels = torch.tensor([k for _, k, _ in plan.validation])
    eval_map = plan.tax.eval_index_map()
    params = AugmentParams()
    calibration = loop.calibration_sample(len(plan.train), plan.seed)
    x_train = x_val = None
    run_id = uuid.uuid4().hex[:8]
    history = []
    for epoch in range(1, plan.epochs + 1):
        started = time.perf_counter()
        if x_train is None:  # the first epoch reads the cells, as the workers do
            x_train = _inputs(ctx, [c for _, _, c in plan.train], plan.input_size)
            x_val = _inputs(ctx, [c for _, _, c in plan.validation], plan.input_size)
        for group in opt.param_groups:
            group["lr"] = loop.epoch_lr(plan.learning_rate, epoch, plan.epochs)
        order = torch.randperm(len(labels), generator=seeded_generator(plan.seed * 100_003 + epoch))
        gen = seeded_generator(plan.seed * 7_919 + epoch * 31)
        model.train()
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            x = _as_input(augment(x_train[idx], gen, params, loop.CROP_BACKGROUND))
            loss = F.cross_entropy(model(x), labels[idx], weight=weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        train_seconds = time.perf_counter() - started
        loop.recalibrate_batchnorm(model, _as_input(x_train[calibration]))
        model.eval()
        right = seen = 0.0
        with torch.no_grad():
            for start in range(0, len(val_labels), 64):
                r, s = loop.validation_hits(
                    model,
                    _as_input(x_val[start : start + 64]),
                    val_labels[start : start + 64],
                    eval_map,
                )
                right, seen = right + r, seen + s
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
        ctx.store.put(f"bench/checkpoints/{run_id}/state.pt", buf.getvalue())
        history.append(
            {
                "epoch": epoch,
                "samples_per_second": len(order) / train_seconds,
                "epoch_s": time.perf_counter() - started,
                "validation_accuracy": right / max(seen, 1.0),
            }
        )
    return history


def _inputs(ctx: BenchStack, cell_ids: list[int], size: int) -> torch.Tensor:
    return torch.from_numpy(thumbs.to_batch(thumbs.fetch(ctx.db, ctx.store, cell_ids, size)))


def ray_run(settings: TrainerSettings, ctx: BenchStack, plan: Plan) -> list[dict]:
    """A training run through the trainer's runner; per-epoch records with the wall
    time between the workers' progress records."""
    seen_at: list[float] = [time.perf_counter()]

    def on_progress(progress: dict | None) -> bool:
        if progress is not None:
            seen_at.append(time.perf_counter())
        return False

    extra = {}
    if "inputs" in inspect.signature(runner.run).parameters:
        # The trainer stages the cells' thumbs for its workers: the driver reads them,
        # as the trainer service does for a job.
        extra["inputs"] = runner.training_inputs(ctx.db, ctx.store, plan)
    job_id = f"bench-{uuid.uuid4().hex[:8]}"
    state = runner.run(job_id, plan, settings, ctx.store, on_progress, **extra)
    history = state["history"]
    gaps = np.diff(seen_at).tolist()
    for i, record in enumerate(history):
        # Epoch 1's gap also holds the run's start; a missed poll leaves a gap unknown.
        record["epoch_s"] = gaps[i] if len(gaps) == len(history) and i > 0 else math.nan
    return history


def _sample(history: list[dict], samples_per_epoch: int, seconds: float) -> Sample:
    later = history[1:] or history
    epoch_s = [h["epoch_s"] for h in later if not math.isnan(h["epoch_s"])]
    return Sample(
        samples_per_epoch * len(history),
        seconds,
        rates=[h["samples_per_second"] for h in later],
        extra={
            "epochs": len(history),
            "epoch_s": epoch_s,
            "first_epoch_s": history[0]["epoch_s"],
            "validation_accuracy": history[-1].get("validation_accuracy"),
        },
    )


def run(ctx: BenchStack, meter: CpuMeter) -> list[ArmResult]:
    opts = ctx.options
    settings = load(TrainerSettings, progress_poll_s=0.1)
    cells = ctx.ensure_cells(opts.cells)
    probe = make_plan(settings, cells, 1)
    n_train = len(probe.train)
    # One plain epoch, timed: warms the thumbs and sets the epochs a run needs.
    first = plain_run(ctx, probe, opts.threads)[0]
    epochs = max(3, 1 + math.ceil(opts.seconds * first["samples_per_second"] / n_train))
    plan = make_plan(settings, cells, epochs)
    print(
        f"  {n_train} training / {len(plan.validation)} validation cells at "
        f"{plan.input_size} px, batch {plan.batch_size} x {WORKERS}, {epochs} epochs a run",
        flush=True,
    )
    runner.ensure_ray(settings.ray_address)

    def ray_pass() -> Sample:
        started = time.perf_counter()
        history = ray_run(settings, ctx, plan)
        return _sample(history, n_train, time.perf_counter() - started)

    def plain_pass() -> Sample:
        started = time.perf_counter()
        history = plain_run(ctx, plan, opts.threads)
        return _sample(history, n_train, time.perf_counter() - started)

    per_sample = flops.classifier_training(settings.input_size)
    arms = [
        Arm(NAME, "ray 2 workers", "samples", per_sample, ray_pass, note="runner.run"),
        Arm(NAME, "plain", "samples", per_sample, plain_pass, note=f"{opts.threads} threads"),
    ]
    results = run_alternated(arms, opts.rounds, opts.seconds, meter)
    for r in results:
        epoch_s = [s for p in r.passes for s in p["epoch_s"]]
        r.figures = {
            "epoch_s": median(epoch_s) if epoch_s else math.nan,
            # A whole run of the epochs: for Ray, its start and end included.
            "run_s": median(p["seconds"] for p in r.passes),
        }
    return results
