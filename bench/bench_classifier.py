"""Classifier: pool prediction, fetch to stored prediction, through the service and in
this process; and single-cell Classify latency.

The model is an untrained ``CellClassifier`` at the default input size, registered
and activated as a version (speed does not depend on the weights). The cells are
those the segmenter cut from the bench's uploads (``BenchStack.ensure_cells``).

- ``service``: ``PredictPool`` over the cells through the classifier service: the
  service fetches the cells' inputs, Triton runs the version, the predictions are
  written to Postgres.
- ``in-process``: the classifier's own pool prediction (``services.classifier.
  inference.Inference.predict_pool``: the same fetch, batching and database write)
  run in this process, the forward pass done here by the version's stored
  TorchScript (``model.pt``, what Triton's backend loads) instead of over gRPC to
  Triton; ``--threads`` intra-op threads.

Before every pass the version's predictions of those cells are deleted (not timed),
so each pass predicts and writes every cell. A pass is one pool of ``--cells``.

- ``Classify 1 image`` / ``Classify 1 cell``: single-cell ``Classify`` calls one
  after another, with a crop's PNG bytes or with a stored cell's id; the rate is
  calls/s and ``p50_ms``/``p99_ms`` the latency over every call of the run.
"""

from __future__ import annotations

import inspect
import io
import time

import numpy as np
import torch

from bench import flops
from bench.context import BenchStack
from bench.harness import Arm, ArmResult, CpuMeter, Sample, run_alternated
from bmcell import images, modelstore
from bmcell.db import Database
from bmcell.network import DEFAULT_INPUT_SIZE, CellClassifier
from bmcell.settings import ClassifierSettings, load
from bmcell.storage import ObjectStore
from bmcell.taxonomy import DEFAULT_TAXONOMY
from bmcell.v1 import classifier_pb2, classifier_pb2_grpc
from services.classifier.inference import Inference
from services.classifier.serving import ModelServing

NAME = "classifier"
LATENCY_CALLS_PER_PASS = 20


class InProcessForward:
    """What the classifier asks of its Triton client, answered by the version's own
    TorchScript in this process."""

    def __init__(self, store: ObjectStore, model_name: str, version: int) -> None:
        files = modelstore.version_files(store, model_name, version)
        self.model = torch.jit.load(
            io.BytesIO(files[f"{model_name}/{version}/model.pt"]), map_location="cpu"
        ).eval()

    def infer(self, model_name: str, version: int, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model(torch.from_numpy(np.ascontiguousarray(batch))).numpy()

    def version_ready(self, model_name: str, version: int) -> bool:
        return True

    def load(self, model_name: str, timeout_s: float = 0.0) -> None:
        return None

    def close(self) -> None:
        return None


def clear_predictions(db: Database, model_name: str, version: int) -> None:
    """The bench's version predicts the same cells pass after pass: its rows go first."""
    with db.transaction() as conn:
        conn.execute(
            "DELETE FROM predictions WHERE model_name = %s AND model_version = %s",
            (model_name, version),
        )


def run(ctx: BenchStack, meter: CpuMeter) -> list[ArmResult]:
    opts = ctx.options
    settings = load(ClassifierSettings)
    cells = ctx.ensure_cells(opts.cells)
    ids = [c.cell_id for c in cells]
    torch.manual_seed(0)
    model = CellClassifier(DEFAULT_TAXONOMY.num_classes).eval()
    version = modelstore.register_version(
        ctx.db,
        ctx.store,
        model,
        DEFAULT_TAXONOMY,
        DEFAULT_INPUT_SIZE,
        model_name=settings.model_name,
        note="bench",
    )
    print(f"  {len(ids)} cells, CellClassifier v{version} at {DEFAULT_INPUT_SIZE} px", flush=True)
    forward = InProcessForward(ctx.store, settings.model_name, version)
    # Built as the service builds its own (services/classifier/server.py), with as many
    # batches in flight where the service has that setting.
    concurrency = {}
    if "in_flight" in inspect.signature(Inference).parameters:
        concurrency["in_flight"] = settings.triton_in_flight
    local = Inference(
        ctx.db,
        ctx.store,
        forward,  # type: ignore[arg-type]  # the Triton client's interface
        ModelServing(ctx.db, ctx.store, forward, settings.model_name),  # type: ignore[arg-type]
        settings.batch_size,
        images.Limits.of(settings),
        max_pool_cells=settings.max_pool_cells,
        **concurrency,
    )
    crop_pngs = [ctx.store.get(c.crop_key) for c in cells[:64]]

    with ctx.channel("classifier") as ch:
        stub = classifier_pb2_grpc.ClassifierStub(ch)
        stub.ActivateModel(classifier_pb2.ActivateModelRequest(version=version), timeout=300)

        def prepare() -> None:
            clear_predictions(ctx.db, settings.model_name, version)

        def service() -> Sample:
            started = time.perf_counter()
            updates = list(
                stub.PredictPool(
                    classifier_pb2.PredictPoolRequest(cell_ids=ids, model_version=version)
                )
            )
            seconds = time.perf_counter() - started
            _check_written(updates, ids)
            return Sample(len(ids), seconds)

        def in_process() -> Sample:
            torch.set_num_threads(opts.threads)
            started = time.perf_counter()
            updates = list(local.predict_pool(ids, version))
            seconds = time.perf_counter() - started
            _check_written(updates, ids)
            return Sample(len(ids), seconds)

        def classify(request: classifier_pb2.ClassifyRequest) -> float:
            started = time.perf_counter()
            stub.Classify(request, timeout=60)
            return time.perf_counter() - started

        calls = iter(range(10**9))

        def latency_pass(make) -> Sample:  # noqa: ANN001 - index -> ClassifyRequest
            lat = [classify(make(next(calls))) for _ in range(LATENCY_CALLS_PER_PASS)]
            return Sample(
                len(lat), sum(lat), rates=[1.0 / s for s in lat], extra={"latency_s": lat}
            )

        def by_image(i: int) -> classifier_pb2.ClassifyRequest:
            return classifier_pb2.ClassifyRequest(images=[crop_pngs[i % len(crop_pngs)]])

        def by_cell(i: int) -> classifier_pb2.ClassifyRequest:
            return classifier_pb2.ClassifyRequest(cell_ids=[ids[i % len(ids)]])

        per_cell = flops.classifier_forward(DEFAULT_INPUT_SIZE)
        pool_arms = [
            Arm(NAME, "service", "cells", per_cell, service, prepare, "PredictPool"),
            Arm(NAME, "in-process", "cells", per_cell, in_process, prepare, "predict_pool here"),
        ]
        latency_arms = [
            Arm(NAME, "Classify 1 image", "calls", per_cell, lambda: latency_pass(by_image)),
            Arm(NAME, "Classify 1 cell", "calls", per_cell, lambda: latency_pass(by_cell)),
        ]
        for arm in pool_arms + latency_arms:  # Triton loads the version; every path warm
            if arm.prepare:
                arm.prepare()
            arm.run_pass()
        results = run_alternated(pool_arms, opts.rounds, opts.seconds, meter)
        latency = run_alternated(latency_arms, opts.rounds, opts.seconds / 2, meter)
    for r in latency:
        ms = np.array([s for p in r.passes for s in p["latency_s"]]) * 1000.0
        r.figures = {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}
        for p in r.passes:  # the percentiles say it; keep the JSON small
            del p["latency_s"]
    return results + latency


def _check_written(updates: list, ids: list[int]) -> None:
    """The last progress says every cell was predicted and written by this pass."""
    last = updates[-1] if updates else None
    if last is None or not last.finished or last.written != len(ids):
        raise RuntimeError(f"pool prediction did not write all {len(ids)} cells: {last}")
