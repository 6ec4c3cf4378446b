"""Upload + segmentation through the running segmenter: fields/s from concurrent lab clients.

Each client is one lab (``speed-<run>-<i>``) sending its own fresh synthetic 704x704
fields (new pixels every run, so nothing is a duplicate), ``--jobs`` in flight, over
one TLS channel each, as ``bmcell upload`` does. The stack's settings come from its
``stack.env`` (``set -a; . <run dir>/stack.env``), the operator's ``BMCELL_TOKEN`` among them.

    PYTHONPATH=$PWD .venv/bin/python scripts/segmenter_speed.py [--clients 3] [--fields 12]

Prints the rate, the cells found, the server's own segmentation seconds and the load
average before and after.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from bmcell.grpc_client import bearer, channel
from bmcell.synth import lab_style, render_field, specimen_mix
from bmcell.v1 import segmenter_pb2, segmenter_pb2_grpc


def _load() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def _fields(count: int, size: int, seed: int) -> list[bytes]:
    _, mix = specimen_mix(11, 0, 0)
    style = lab_style(11, "lab-b")
    out = []
    for i in range(count):
        image = render_field(np.random.default_rng(seed + i), style, mix, size).image
        noise = np.random.default_rng().integers(-1, 2, image.shape)
        fresh = np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(fresh).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def _requests(data: bytes, lab: str, specimen: str):
    yield segmenter_pb2.UploadRequest(
        header=segmenter_pb2.UploadHeader(
            lab=lab, specimen=specimen, sha256=hashlib.sha256(data).hexdigest()
        )
    )
    for start in range(0, len(data), 1 << 20):
        yield segmenter_pb2.UploadRequest(chunk=data[start : start + (1 << 20)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=3, help="concurrent labs")
    parser.add_argument("--fields", type=int, default=12, help="fields per client")
    parser.add_argument("--jobs", type=int, default=2, help="uploads in flight per client")
    parser.add_argument("--size", type=int, default=704)
    args = parser.parse_args()
    addr = os.environ["BMCELL_SEGMENTER_ADDR"]
    metadata = bearer(os.environ["BMCELL_TOKEN"])
    run = uuid.uuid4().hex[:6]
    blobs = [_fields(args.fields, args.size, 900 + 100 * c) for c in range(args.clients)]
    deadline = 60 + 20 * args.fields * args.clients  # the whole run's work, queued

    def client(c: int) -> list:
        lab = f"speed-{run}-{c}"
        with channel(addr, default_timeout_s=deadline) as ch:
            stub = segmenter_pb2_grpc.SegmenterStub(ch)
            with ThreadPoolExecutor(args.jobs) as pool:
                return list(
                    pool.map(
                        lambda b: stub.Upload(_requests(b, lab, "s1"), metadata=metadata),
                        blobs[c],
                    )
                )

    load_before = _load()
    started = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        results = [r for rs in pool.map(client, range(args.clients)) for r in rs]
    elapsed = time.perf_counter() - started
    load_after = _load()
    assert not any(r.duplicate for r in results)
    seg = sorted(r.segmentation_seconds for r in results)
    print(
        f"{len(results)} fields ({args.size}x{args.size}) from {args.clients} clients, "
        f"{args.jobs} in flight each: {len(results) / elapsed:.2f} fields/s "
        f"({elapsed:.1f} s); cells {sum(r.cells for r in results)}; server segmentation "
        f"median {seg[len(seg) // 2]:.3f} s; load average before {' '.join(load_before)}, "
        f"after {' '.join(load_after)}"
    )


if __name__ == "__main__":
    main()
