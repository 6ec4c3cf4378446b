"""What every Ray Train worker runs: one DDP replica of the round's training.

The driver (``services.trainer.runner``) passes everything a worker needs in
``train_loop_config`` (a :class:`LoopConfig` as a dict): object-storage settings, the
class index of every training and validation cell, the object key of their inputs
and the optimisation settings. The inputs are one ``.npy`` object the driver wrote
from the cells' thumbs (``bmcell.thumbs``, uint8 at the network's input size):
training cells first, then validation cells. A worker reads it once at start and
makes every batch from it in memory (:class:`Inputs`), so no epoch reads or decodes
a crop.

Fault tolerance: after every epoch rank 0 reports a checkpoint (model, optimiser,
epoch, history) through ``ray.train.report``; Ray Train persists it under the run's
storage (object storage in bmcell). A worker group restarted after a failure, or a
whole run restarted by a new trainer process under the same run name, gets it back
from ``ray.train.get_checkpoint()`` and continues with the next epoch. Each
(re)start is recorded in the checkpointed ``starts`` list, so the history shows that
finished epochs were not run again. The checkpoint is written every epoch, not only
on improvement: that is what bounds the work a failure costs to the epoch in flight
(it measured well under a second an epoch: ``checkpoint_seconds`` in the history).

Progress for the driver: rank 0 writes ``<prefix>/progress.json`` after each epoch
(after its checkpoint, so the epoch's ``seconds`` include it), and every rank writes
``<prefix>/workers/<rank>.json`` (its pid) at start. The driver asks for
cancellation by writing ``<prefix>/cancel``; rank 0 checks it after each epoch and
tells the others, so all ranks stop at the same epoch.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bmcell.errors import NotFound
from bmcell.evaluation import merged_hits
from bmcell.network import CellClassifier
from bmcell.preprocess import SCALE
from bmcell.settings import Settings, load
from bmcell.storage import ObjectStore
from services.trainer.augment import AugmentParams, augment, seeded_generator

CHECKPOINT_FILE = "state.pt"
#: Crops have their extracellular area painted white (``bmcell.synth.CROP_FILL``,
#: the segmenter does the same), so pixels the augmentation pulls in from outside
#: the crop are white too: 1.0 after ``preprocess.uint8_to_batch``'s scaling.
CROP_BACKGROUND = 1.0


@dataclass
class LoopConfig:
    job_id: str
    prefix: str  # object-storage folder of the job's progress and control objects
    s3: dict[str, Any]
    inputs_key: str  # the .npy of the cells' uint8 inputs: training cells, then validation
    train_labels: list[int]  # training-class index per training cell
    validation_labels: list[int]
    num_classes: int
    input_size: int
    epochs: int
    batch_size: int
    learning_rate: float
    momentum: float
    class_weights: list[float]
    init_state_key: str | None = None  # previous version's state_dict (transfer)
    seed: int = 0
    threads: int = 1
    augment: dict[str, Any] = field(default_factory=dict)
    # Training class index -> evaluation class index (``Taxonomy.eval_index_map``);
    # empty: every class is its own (a config written before the merge was passed).
    eval_index_map: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def worker_store(s3: dict[str, Any]) -> ObjectStore:
    """Object storage from the settings the driver passed (workers have no BMCELL_* env)."""
    return ObjectStore(load(Settings, database_url="unused-by-training-workers", **s3))


class Inputs:
    """Every cell's network input, uint8 ``(N, S, S, 3)`` as the thumbs store them,
    made into float32 batches on demand.

    Kept as uint8 (12 KiB a cell at 64 px; float would be four times that per worker),
    and converted per batch: ``x / 255`` in float32, the numbers
    ``preprocess.uint8_to_batch`` gives, bit for bit. The ``(N, S, S, 3)`` layout is
    already PyTorch's ``channels_last`` for ``(N, 3, S, S)``, so a batch is a view
    permuted into place, no copy of the channels.
    """

    def __init__(self, pixels: np.ndarray) -> None:
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(
                f"inputs must be uint8 (N, S, S, 3), got {pixels.dtype} {pixels.shape}"
            )
        self.pixels = torch.from_numpy(np.ascontiguousarray(pixels))
        self._scale = torch.tensor(SCALE, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.pixels)

    def batch(self, idx: torch.Tensor | list[int]) -> torch.Tensor:
        """float32 ``(B, 3, S, S)`` in ``channels_last`` memory, values in [0, 1]."""
        u8 = self.pixels[torch.as_tensor(idx, dtype=torch.long)]
        return u8.permute(0, 3, 1, 2).to(torch.float32).mul_(self._scale)


def load_inputs(store: ObjectStore, key: str, cells: int, size: int) -> Inputs:
    """The driver's packed inputs, checked against the config's cell count and size."""
    pixels = np.load(io.BytesIO(store.get(key)), allow_pickle=False)
    if pixels.shape != (cells, size, size, 3):
        raise ValueError(
            f"{key}: inputs of shape {pixels.shape}, the job needs ({cells}, {size}, {size}, 3)"
        )
    return Inputs(pixels)


def as_input(x: torch.Tensor) -> torch.Tensor:
    """The network's input in ``channels_last`` memory: measured faster on this CPU for
    the classifier's convolutions and poolings (docs/trainer.md)."""
    return x.contiguous(memory_format=torch.channels_last)


def _put_json(store: ObjectStore, key: str, value: Any) -> None:
    store.put(key, json.dumps(value).encode(), "application/json")


def _sum_across(values: list[float], world: int) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


BN_CALIBRATION_CELLS = 512


def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch: int = 64) -> None:
    """Replace BatchNorm running statistics by their exact values on ``x`` (plain,
    unaugmented training crops: what evaluation sees).

    During training the running mean/variance follow the last few dozen batches of 16
    rotated crops with momentum 0.1, so the statistics used at evaluation lag and
    jitter with every step; measured on the synthetic pool, validation accuracy of one
    set of weights moved by tens of points from epoch to epoch. Recomputing them over a
    fixed sample of training cells ("precise BN") costs one forward pass per epoch.
    Weights are untouched.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or len(x) == 0:
        return
    was_training = model.training
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for start in range(0, len(x), batch):
            model(x[start : start + batch])
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)


def calibration_sample(n_train: int, seed: int, size: int = BN_CALIBRATION_CELLS) -> list[int]:
    """Indices of the training cells BatchNorm is recalibrated on: ``size`` drawn at
    random, seeded by the round, the same for every epoch and every (re)start of the
    run. The first ``size`` of the list would be the oldest labels, skewed by class."""
    order = torch.randperm(n_train, generator=seeded_generator(seed * 65_537 + 12_345))
    return sorted(order[:size].tolist())


def validation_hits(
    model: nn.Module, x: torch.Tensor, labels: torch.Tensor, eval_index_map: list[int]
) -> tuple[float, float]:
    """(right, seen) on one validation batch, scored on evaluation classes (BN and ART
    merged), the measure the publish gate applies: best epoch and gate read one number."""
    pred = model(x).argmax(1)
    mapping = eval_index_map or list(range(int(max(pred.max(), labels.max())) + 1))
    return float(merged_hits(labels.numpy(), pred.numpy(), mapping)), float(len(pred))


def is_better(record: dict, best: dict | None) -> bool:
    """Early stopping's model selection on the merged validation accuracy. Ties go to
    the later (longer-trained) epoch."""
    return best is None or record["validation_accuracy"] >= best["validation_accuracy"]


def _bare(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def epoch_lr(base: float, epoch: int, epochs: int) -> float:
    """The study's lr (0.01 in round 1, 0.005 after) at the start, annealed to a tenth of it
    by the last epoch along a cosine. A constant lr leaves the weights of a
    few-hundred-cell training set jumping between epochs (validation accuracy swings by
    30 points from one epoch to the next); annealing lets the last epoch's model, the
    one published, settle. A function of the epoch alone, so a resumed job continues
    on the same schedule.
    """
    if epochs <= 1:
        return base
    progress = (epoch - 1) / (epochs - 1)
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_loop(config_dict: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the TorchTrainer."""
    import ray.train
    import ray.train.torch

    cfg = LoopConfig(**config_dict)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # One intra-op thread per CPU the worker reserved: workers sharing cores would
    # otherwise contend (two threads on a shared core ran slower than one).
    torch.set_num_threads(max(1, cfg.threads))
    store = worker_store(cfg.s3)
    n_train, n_val = len(cfg.train_labels), len(cfg.validation_labels)
    inputs = load_inputs(store, cfg.inputs_key, n_train + n_val, cfg.input_size)

    model = CellClassifier(cfg.num_classes).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum)
    state: dict[str, Any] = {"epoch": 0, "history": [], "starts": []}
    best: dict[str, Any] | None = None  # weights of the best validation epoch so far
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = {k: saved[k] for k in ("epoch", "history", "starts")}
        best = saved.get("best")
    elif cfg.init_state_key:
        data = store.get(cfg.init_state_key)
        model.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    state["starts"].append({"from_epoch": state["epoch"], "at": time.time()})
    _put_json(
        store,
        f"{cfg.prefix}/workers/{rank}.json",
        {"pid": os.getpid(), "rank": rank, "from_epoch": state["epoch"]},
    )

    model = ray.train.torch.prepare_model(model)  # DDP (gloo on CPU) when world > 1
    weights = torch.tensor(cfg.class_weights, dtype=torch.float32)
    params = AugmentParams(**cfg.augment) if cfg.augment else AugmentParams()
    labels = torch.tensor(cfg.train_labels, dtype=torch.long)
    # Validation cells follow the training cells in ``inputs``; each rank scores a stride.
    val_rows = torch.arange(n_train, n_train + n_val)[rank::world]
    val_labels = torch.tensor(cfg.validation_labels, dtype=torch.long)[rank::world]
    calibration = as_input(inputs.batch(calibration_sample(n_train, cfg.seed)))

    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr(cfg.learning_rate, epoch, cfg.epochs)
        # Same permutation on every rank (seeded by epoch); each takes its stride.
        order = torch.randperm(n_train, generator=seeded_generator(cfg.seed * 100_003 + epoch))
        mine = order[rank::world]
        # Equal step counts on all ranks, or DDP's all-reduce waits forever.
        steps = -(-len(order) // (world * cfg.batch_size))
        generator = seeded_generator(cfg.seed * 7_919 + epoch * 31 + rank)
        model.train()
        loss_sum = correct = seen = 0.0
        for step in range(steps):
            idx = mine[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            if len(idx) == 0:  # a short last stride: repeat the first batch's cells
                idx = mine[: cfg.batch_size]
            x = as_input(augment(inputs.batch(idx), generator, params, CROP_BACKGROUND))
            y = labels[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y, weight=weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += float((logits.argmax(1) == y).sum())
            seen += len(idx)
        train_seconds = time.perf_counter() - started

        recalibrate_batchnorm(_bare(model), calibration)
        model.eval()
        v_correct = v_seen = 0.0
        with torch.no_grad():
            for start in range(0, len(val_rows), 64):
                x = as_input(inputs.batch(val_rows[start : start + 64]))
                right, seen_now = validation_hits(
                    _bare(model), x, val_labels[start : start + 64], cfg.eval_index_map
                )
                v_correct += right
                v_seen += seen_now
        loss_sum, correct, seen, v_correct, v_seen = _sum_across(
            [loss_sum, correct, seen, v_correct, v_seen], world
        )
        record = {
            "epoch": epoch,
            "loss": loss_sum / max(seen, 1.0),
            "train_accuracy": correct / max(seen, 1.0),
            "validation_accuracy": v_correct / v_seen if v_seen else 0.0,
            "samples_per_second": seen / max(train_seconds, 1e-9),
            "train_seconds": train_seconds,
            # BatchNorm recalibration and the validation pass.
            "validation_seconds": time.perf_counter() - started - train_seconds,
            "start": len(state["starts"]) - 1,  # which (re)start of the run trained it
        }
        state["history"].append(record)
        state["epoch"] = epoch
        # Early stopping's model selection: with a few hundred training cells the
        # validation accuracy still swings between late epochs, and publishing the last
        # epoch would be a draw.
        if rank == 0 and is_better(record, best):
            best = {
                "epoch": epoch,
                "validation_accuracy": record["validation_accuracy"],
                "model": {k: v.detach().clone() for k, v in _bare(model).state_dict().items()},
            }
        reporting = time.perf_counter()
        _report(cfg, rank, model, optimizer, {**state, "best": best}, record)
        # The checkpoint's own history has this epoch without these two; the next
        # checkpoint and progress.json have them (runner.run merges the last one).
        record["checkpoint_seconds"] = time.perf_counter() - reporting
        record["seconds"] = time.perf_counter() - started  # the epoch's wall time, all in
        if rank == 0:
            _put_json(store, f"{cfg.prefix}/progress.json", state)
        if _cancel_requested(store, cfg.prefix, rank, world):
            return


def _report(cfg, rank, model, optimizer, state, record) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(record)
        return
    with tempfile.TemporaryDirectory(prefix=f"bmcell-{cfg.job_id}-") as d:
        torch.save(
            {
                "model": _bare(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                **state,
            },
            Path(d) / CHECKPOINT_FILE,
        )
        ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(d))


def _cancel_requested(store: ObjectStore, prefix: str, rank: int, world: int) -> bool:
    flag = torch.zeros(1)
    if rank == 0:
        try:
            flag[0] = float(store.exists(f"{prefix}/cancel"))
        except NotFound:
            flag[0] = 0.0
    if world > 1:
        dist.broadcast(flag, src=0)
    return bool(flag[0])


def load_checkpoint_state(directory: str | Path) -> dict[str, Any]:
    """The dict rank 0 saved in a checkpoint directory."""
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
