"""Fields per second: segmentation alone in this process, and upload + segmentation
through the running segmenter service (``BMCELL_SEGMENTER_ADDR``; skipped if unset),
with ``BMCELL_TOKEN`` or, when that is unset, a token of operator ``bench`` issued
through ``BMCELL_DATABASE_URL`` as ``bmcell users`` would.

    .venv/bin/python -m bench.bench_segmenter [--fields 8] [--size 704] [--jobs 2]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bmcell.synth import lab_style, render_field, specimen_mix
from services.segmenter import instances, unet

WEIGHTS = sorted((Path(__file__).resolve().parents[1] / "services/segmenter/weights").glob("*.pt"))


def _fields(count: int, size: int) -> list[np.ndarray]:
    _, mix = specimen_mix(11, 0, 0)
    style = lab_style(11, "lab-b")
    return [
        render_field(np.random.default_rng(900 + i), style, mix, size).image for i in range(count)
    ]


def in_process(images: list[np.ndarray], threads: int) -> float:
    torch.set_num_threads(threads)
    model, _ = unet.from_bytes(WEIGHTS[-1].read_bytes())
    started = time.perf_counter()
    for image in images:
        probs = unet.predict_probabilities(model, image)
        labels, nuclei = instances.label_instances(probs)
        instances.cells_from(image, labels, nuclei, 282)
    return len(images) / (time.perf_counter() - started)


def _token() -> str:
    token = os.environ.get("BMCELL_TOKEN")
    if token:
        return token
    from bmcell.db import Database
    from bmcell.scenario import operator_token
    from bmcell.settings import Settings, load

    db = Database(load(Settings), name="bench").open()
    try:
        return operator_token(db, "bench")
    finally:
        db.close()


def through_service(images: list[np.ndarray], addr: str, jobs: int, token: str) -> float:
    from bmcell.grpc_client import bearer, channel
    from bmcell.v1 import segmenter_pb2, segmenter_pb2_grpc

    specimen = f"bench-{uuid.uuid4().hex[:8]}"
    blobs = []
    for image in images:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "PNG")
        blobs.append(buf.getvalue())

    def requests(data: bytes):
        yield segmenter_pb2.UploadRequest(
            header=segmenter_pb2.UploadHeader(lab="bench", specimen=specimen)
        )
        for i in range(0, len(data), 1 << 20):
            yield segmenter_pb2.UploadRequest(chunk=data[i : i + (1 << 20)])

    with channel(addr, default_timeout_s=600) as ch:
        stub = segmenter_pb2_grpc.SegmenterStub(ch)
        started = time.perf_counter()
        with ThreadPoolExecutor(jobs) as pool:
            results = list(
                pool.map(lambda b: stub.Upload(requests(b), metadata=bearer(token)), blobs)
            )
        elapsed = time.perf_counter() - started
    assert not any(r.duplicate for r in results)
    return len(blobs) / elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fields", type=int, default=8)
    parser.add_argument("--size", type=int, default=704)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv or [])
    images = _fields(args.fields, args.size)
    rate = in_process(images, args.threads)
    print(
        f"segmentation in-process ({args.size}x{args.size}, {args.threads} threads): "
        f"{rate:.2f} fields/s"
    )
    addr = os.environ.get("BMCELL_SEGMENTER_ADDR")
    if not addr:
        print("upload + segmentation through the service: skipped (BMCELL_SEGMENTER_ADDR unset)")
        return
    # Fresh pixels so the service cannot answer from its content-addressed cache.
    fresh = [
        np.clip(
            i.astype(np.int16) + np.random.default_rng().integers(-1, 2, i.shape), 0, 255
        ).astype(np.uint8)
        for i in images
    ]
    rate = through_service(fresh, addr, args.jobs, _token())
    print(f"upload + segmentation through the service ({args.jobs} in flight): {rate:.2f} fields/s")


if __name__ == "__main__":
    main(sys.argv[1:])
