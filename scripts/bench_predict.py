"""Pool prediction and single-cell Classify through the services, on a stack of its own.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_predict.py --port-base 28750 --cells 2000

Starts a stack under ``.run/bench-predict`` (ports from ``--port-base``), registers and
activates an untrained ``CellClassifier`` at the default input size, seeds ``--cells``
cells with 282x282 PNG crops and their thumbs (as the segmenter stores them), then,
``--rounds`` times:

- ``PredictPool`` of all the cells, fetch to stored prediction (the version's rows are
  deleted before each pass, so every pass does the whole work);
- ``--calls`` single-cell ``Classify`` calls by cell id and by image, one at a time.

Prints each pass, the medians and the load average before and after. Speeds are
not asserted anywhere: the figures are for people to compare.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import numpy as np
import torch

from bmcell import grpc_client, modelstore, thumbs
from bmcell.db import Database
from bmcell.network import DEFAULT_INPUT_SIZE, CellClassifier
from bmcell.settings import Settings, load
from bmcell.stack import Stack, StackConfig
from bmcell.stack.config import REPO
from bmcell.storage import ObjectStore
from bmcell.taxonomy import DEFAULT_TAXONOMY
from bmcell.v1 import classifier_pb2, classifier_pb2_grpc
from tests.integration.seed import seed_cells, synth_crops


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def predict_pool(stub, cells: list[int], timeout_s: float) -> float:
    started = time.perf_counter()
    updates = list(
        stub.PredictPool(classifier_pb2.PredictPoolRequest(cell_ids=cells), timeout=timeout_s)
    )
    last = updates[-1] if updates else None
    elapsed = time.perf_counter() - started
    assert last is not None and last.finished and last.done == len(cells), last
    return elapsed


def latencies(call, n: int) -> np.ndarray:
    out = []
    for i in range(n):
        started = time.perf_counter()
        call(i)
        out.append(time.perf_counter() - started)
    return np.asarray(out) * 1000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port-base", type=int, default=28750)
    ap.add_argument("--cells", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--keep-up", action="store_true", help="leave the stack running")
    ap.add_argument(
        "--attach",
        action="store_true",
        help="measure a stack a --keep-up run left (its cells and active version): "
        "two trees' stacks can then be measured in turns, A B A B",
    )
    args = ap.parse_args()

    stack = Stack(
        StackConfig(run_dir=REPO / ".run" / "bench-predict", port_base=args.port_base),
        progress=lambda msg: None,
    )
    saved = dict(os.environ)
    if not args.attach:
        stack.down()
        shutil.rmtree(stack.config.run_dir, ignore_errors=True)  # every run starts from empty
    try:
        t0 = time.perf_counter()
        if not args.attach:
            stack.up()
            print(f"stack up: {time.perf_counter() - t0:.1f}s", flush=True)
        os.environ.update(stack.env())
        settings = load(Settings)
        db = Database(settings).open()
        store = ObjectStore(settings).ensure_buckets()
        try:
            run(stack, settings, db, store, args)
        finally:
            db.close()
    finally:
        os.environ.clear()
        os.environ.update(saved)
        if not (args.keep_up or args.attach):
            stack.down()


def run(stack: Stack, settings: Settings, db: Database, store: ObjectStore, args) -> None:
    if args.attach:
        with db.connection() as conn:
            version = conn.execute(
                "SELECT version FROM model_versions WHERE model_name = %s AND state = 'active'",
                (settings.model_name,),
            ).fetchone()["version"]
            rows = conn.execute("SELECT id, crop_key FROM cells ORDER BY id").fetchall()
        cells = [r["id"] for r in rows]
        crops = [store.get(r["crop_key"]) for r in rows[:200]]
    else:
        version, cells, crops = seed(settings, db, store, args.cells)
    with grpc_client.channel(
        stack.config.addr("classifier"), default_timeout_s=600, token=stack.operator_token()
    ) as ch:
        stub = classifier_pb2_grpc.ClassifierStub(ch)
        if not args.attach:
            stub.ActivateModel(classifier_pb2.ActivateModelRequest(version=version), timeout=300)
        predict_pool(stub, cells[:128], 600)  # loads the version, warms every path
        for c in cells[:20]:
            stub.Classify(classifier_pb2.ClassifyRequest(cell_ids=[c]), timeout=60)
        measure(stub, db, version, cells, crops, args)


def seed(
    settings: Settings, db: Database, store: ObjectStore, n: int
) -> tuple[int, list[int], list[bytes]]:
    torch.manual_seed(0)
    model = CellClassifier(DEFAULT_TAXONOMY.num_classes).eval()
    version = modelstore.register_version(
        db,
        store,
        model,
        DEFAULT_TAXONOMY,
        DEFAULT_INPUT_SIZE,
        model_name=settings.model_name,
        note="bench_predict",
    )
    crops, _ = synth_crops(200, seed=1, size=282)
    cells: list[int] = []
    while len(cells) < n:
        cells += seed_cells(db, store, crops[: n - len(cells)])
    thumbs.fetch(db, store, cells, DEFAULT_INPUT_SIZE)  # stored, as the segmenter does
    print(f"v{version}, {len(cells)} cells (282x282 PNG crops, thumbs stored)", flush=True)
    return version, cells, crops


def measure(stub, db: Database, version: int, cells: list[int], crops: list[bytes], args) -> None:
    print(f"load average before: {loadavg()}", flush=True)
    rates, by_id, by_image = [], [], []
    for r in range(args.rounds):
        with db.transaction() as conn:
            conn.execute("DELETE FROM predictions WHERE model_version = %s", (version,))
        s = predict_pool(stub, cells, 3600)
        rates.append(len(cells) / s)
        by_id.append(
            latencies(
                lambda i: stub.Classify(
                    classifier_pb2.ClassifyRequest(cell_ids=[cells[i % len(cells)]]),
                    timeout=60,
                ),
                args.calls,
            )
        )
        by_image.append(
            latencies(
                lambda i: stub.Classify(
                    classifier_pb2.ClassifyRequest(images=[crops[i % len(crops)]]),
                    timeout=60,
                ),
                args.calls,
            )
        )
        print(
            f"pass {r + 1}: PredictPool {rates[-1]:7.1f} cells/s ({len(cells)} in {s:.1f}s); "
            f"Classify by id p50 {np.percentile(by_id[-1], 50):6.1f} ms "
            f"p99 {np.percentile(by_id[-1], 99):6.1f} ms; by image "
            f"p50 {np.percentile(by_image[-1], 50):6.1f} ms "
            f"p99 {np.percentile(by_image[-1], 99):6.1f} ms; load {loadavg()}",
            flush=True,
        )
    if not rates:
        return
    ids, imgs = np.concatenate(by_id), np.concatenate(by_image)
    print(
        f"median PredictPool {np.median(rates):.1f} cells/s; Classify by id "
        f"p50 {np.percentile(ids, 50):.1f} / p99 {np.percentile(ids, 99):.1f} ms, by image "
        f"p50 {np.percentile(imgs, 50):.1f} / p99 {np.percentile(imgs, 99):.1f} ms; "
        f"load average after: {loadavg()}",
        flush=True,
    )


if __name__ == "__main__":
    main()
