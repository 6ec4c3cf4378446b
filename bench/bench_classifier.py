"""Classifier throughput: PredictPool through the service and Triton against in-process TorchScript.

Starts a stack of its own (``.run/bench``, ports from ``BMCELL_BENCH_PORT_BASE``,
default 28800), registers and activates an untrained ``CellClassifier`` at the
default input size, seeds synthetic cells and measures, in one run:

(a) cells/s of ``PredictPool``, end to end: crops fetched from object storage,
    preprocessed, inferred by Triton, predictions written to Postgres;
(b) cells/s of the same TorchScript model in this process on the same PNG crops,
    batch 64, 2 torch threads, decoding and preprocessing included;
(c) (a) / (b);
(d) p50/p99 latency of a single-cell ``Classify`` with a raw image.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from bmcell import modelrepo, modelstore, preprocess, tls
from bmcell.db import Database
from bmcell.network import DEFAULT_INPUT_SIZE, CellClassifier
from bmcell.settings import Settings, load
from bmcell.stack import Stack, StackConfig
from bmcell.stack.config import REPO
from bmcell.storage import ObjectStore
from bmcell.taxonomy import DEFAULT_TAXONOMY
from bmcell.v1 import classifier_pb2, classifier_pb2_grpc
from tests.integration.seed import seed_cells, synth_crops

N_CELLS = int(os.environ.get("BMCELL_BENCH_CLASSIFIER_CELLS", "512"))
N_WARMUP = 64
BATCH = 64
TORCH_THREADS = 2
LATENCY_CALLS = 200


def _stack() -> Stack:
    base = int(os.environ.get("BMCELL_BENCH_PORT_BASE", 28800))
    cfg = StackConfig(run_dir=REPO / ".run" / "bench", port_base=base)
    return Stack(cfg, progress=lambda msg: None)


def _predict_pool(stub, cells: list[int]) -> float:
    started = time.perf_counter()
    updates = list(
        stub.PredictPool(
            classifier_pb2.PredictPoolRequest(cell_ids=cells, batch_size=BATCH), timeout=600
        )
    )
    last = updates[-1] if updates else None
    elapsed = time.perf_counter() - started
    assert last is not None and last.finished and last.written == len(cells), last
    return elapsed


def _in_process(scripted, crops: list[bytes]) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(crops), BATCH):
            x = preprocess.batch_from_crops(crops[i : i + BATCH], DEFAULT_INPUT_SIZE)
            scripted(torch.from_numpy(x)).numpy()
    return time.perf_counter() - started


def main() -> None:
    stack = _stack()
    saved = dict(os.environ)
    stack.down()
    try:
        t0 = time.perf_counter()
        stack.up()
        print(f"stack up: {time.perf_counter() - t0:.1f}s", flush=True)
        os.environ.update(stack.env())
        settings = load(Settings)
        db = Database(settings).open()
        store = ObjectStore(settings).ensure_buckets()
        try:
            _run(stack, settings, db, store)
        finally:
            db.close()
    finally:
        os.environ.clear()
        os.environ.update(saved)
        stack.down()


def _run(stack: Stack, settings: Settings, db: Database, store: ObjectStore) -> None:
    torch.manual_seed(0)
    model = CellClassifier(DEFAULT_TAXONOMY.num_classes).eval()
    version = modelstore.register_version(
        db,
        store,
        model,
        DEFAULT_TAXONOMY,
        DEFAULT_INPUT_SIZE,
        model_name=settings.model_name,
        note="bench_classifier",
    )
    crops, _ = synth_crops(N_WARMUP + N_CELLS, seed=1)
    warm_cells = seed_cells(db, store, crops[:N_WARMUP])
    cells = seed_cells(db, store, crops[N_WARMUP:])
    measured = crops[N_WARMUP:]
    side = preprocess._to_image(measured[0]).width
    print(
        f"model: CellClassifier v{version}, input {DEFAULT_INPUT_SIZE}, "
        f"{len(cells)} cells ({side}x{side} PNG crops), batch {BATCH}",
        flush=True,
    )

    with tls.grpc_channel(
        stack.config.addr("classifier"),
        options=[("grpc.max_receive_message_length", 64 << 20)],
    ) as ch:
        stub = classifier_pb2_grpc.ClassifierStub(ch)
        stub.ActivateModel(classifier_pb2.ActivateModelRequest(version=version), timeout=300)
        _predict_pool(stub, warm_cells)  # loads the version in Triton, warms every path

        # (a) service + Triton, end to end
        pool_s = _predict_pool(stub, cells)
        pool_rate = len(cells) / pool_s

        # (b) in-process TorchScript, the exact served module, same crops
        torch.set_num_threads(TORCH_THREADS)
        scripted = modelrepo.script_served_model(model).eval()
        _in_process(scripted, crops[:N_WARMUP])
        local_s = _in_process(scripted, measured)
        local_rate = len(measured) / local_s

        # same numbers both ways (sanity: the bench measures the same model)
        resp = stub.Classify(classifier_pb2.ClassifyRequest(images=measured[:8]), timeout=60)
        with torch.inference_mode():
            want = scripted(
                torch.from_numpy(preprocess.batch_from_crops(measured[:8], DEFAULT_INPUT_SIZE))
            ).numpy()
        got = np.array([r.probabilities for r in resp.results], dtype=np.float32)
        max_diff = float(np.abs(got - want).max())

        # (d) single-cell Classify latency
        for c in measured[:10]:
            stub.Classify(classifier_pb2.ClassifyRequest(images=[c]), timeout=60)
        lat = []
        for i in range(LATENCY_CALLS):
            c = measured[i % len(measured)]
            started = time.perf_counter()
            stub.Classify(classifier_pb2.ClassifyRequest(images=[c]), timeout=60)
            lat.append(time.perf_counter() - started)
    lat_ms = np.array(lat) * 1000.0

    ratio = pool_rate / local_rate
    print(
        f"(a) PredictPool end to end (service+Triton): {pool_rate:8.1f} cells/s "
        f"({len(cells)} cells in {pool_s:.2f}s)"
    )
    print(
        f"(b) in-process TorchScript, {TORCH_THREADS} threads, incl. PNG decode+preprocess: "
        f"{local_rate:8.1f} cells/s ({len(measured)} cells in {local_s:.2f}s)"
    )
    print(
        f"(c) ratio PredictPool / in-process: {ratio:.2f} (target >= 0.80: "
        f"{'met' if ratio >= 0.8 else 'NOT met'})"
    )
    print(
        f"(d) single-cell Classify latency over {LATENCY_CALLS} calls: "
        f"p50 {np.percentile(lat_ms, 50):.1f} ms, p99 {np.percentile(lat_ms, 99):.1f} ms"
    )
    print(f"    max |Triton - in-process| probability difference: {max_diff:.2e}", flush=True)


if __name__ == "__main__":
    main()
