"""The one stack a ``make bench`` run measures, and the cells every bench works on.

The stack is started once per run in a private run directory
(``.run/bench-<port base>``, emptied first) and shared by the benches. Cells come
from the segmenter, as in use: synthetic 704x704 fields (``bmcell.synth``) are
uploaded through the service by three lab clients at once, and what the service
cut and stored is what pool prediction and training read.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from bmcell import grpc_client, paging, tls
from bmcell.db import Database
from bmcell.settings import Settings, load
from bmcell.stack import Stack, StackConfig, components
from bmcell.stack.config import REPO
from bmcell.storage import ObjectStore
from bmcell.synth import lab_style, render_field, specimen_mix
from bmcell.v1 import segmenter_pb2, segmenter_pb2_grpc

FIELD_SIZE = 704
LABS = ("bench-lab-1", "bench-lab-2", "bench-lab-3")  # one client each
CHUNK = 1 << 20
#: An upload's deadline: generous per field, as the service may queue a few.
UPLOAD_DEADLINE_S = 300.0


@dataclass
class Options:
    seconds: float = 30.0  # each arm slot at least this long
    rounds: int = 2  # A B A B: each arm this many times
    cells: int = 768  # pool cells the classifier and trainer work on
    fields_per_client: int = 2  # per segmenter pass, for each of the 3 clients
    threads: int = 2  # in-process arms' torch threads: the floor's budget
    port_base: int = 28800


@dataclass
class FieldSource:
    """Distinct 704x704 field PNGs: a few rendered fields, each upload a fresh copy
    with +-1 noise, so the service never answers from its content-addressed cache
    and the work per field stays the same."""

    bases: list[np.ndarray] = field(default_factory=list)
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(17))

    @classmethod
    def rendered(cls, count: int = 6) -> FieldSource:
        _, mix = specimen_mix(11, 0, 0)
        style = lab_style(11, "lab-b")
        images = [
            render_field(np.random.default_rng(900 + i), style, mix, FIELD_SIZE).image
            for i in range(count)
        ]
        return cls(images)

    def pngs(self, count: int) -> list[bytes]:
        out = []
        for i in range(count):
            base = self.bases[i % len(self.bases)]
            noise = self.rng.integers(-1, 2, base.shape, dtype=np.int16)
            image = np.clip(base.astype(np.int16) + noise, 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, "PNG")
            out.append(buf.getvalue())
        return out


class BenchStack:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.config = StackConfig(
            run_dir=REPO / ".run" / f"bench-{options.port_base}", port_base=options.port_base
        )
        self.stack = Stack(self.config, progress=lambda msg: print(f"[stack] {msg}", flush=True))
        # Ray Train's driver (this process) reads checkpoints through pyarrow's S3
        # client, which trusts the stack's CA only through SSL_CERT_FILE, and reads it
        # when pyarrow.fs is imported: make the BenchStack before importing the benches.
        if "pyarrow.fs" in sys.modules:
            raise RuntimeError("BenchStack must be made before pyarrow.fs is imported")
        # So the CA that file names is the one the stack serves with: made now, and kept
        # when a run clears the stack's folder (a new CA there would not be trusted).
        tls.ensure_local_ca(self.config.tls_dir, [self.config.host])
        os.environ.update(components.arrow_s3_trust(self.config))
        self.fields = FieldSource.rendered()
        self._specimens = 0
        self.token = ""
        self.settings: Settings
        self.db: Database
        self.store: ObjectStore

    @contextmanager
    def running(self) -> Iterator[BenchStack]:
        saved = dict(os.environ)
        self.stack.down()
        # A fresh stack every run, under the CA made in __init__.
        for path in self.config.run_dir.iterdir() if self.config.run_dir.exists() else []:
            if path != self.config.tls_dir:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        try:
            self.stack.up()
            os.environ.update(self.stack.env())
            self.token = self.stack.operator_token()
            self.settings = load(Settings)
            self.db = Database(self.settings, name="bench").open()
            self.store = ObjectStore(self.settings).ensure_buckets()
            try:
                yield self
            finally:
                self.db.close()
        finally:
            _leave_ray()  # before its cluster stops, or Ray's client ends this process
            os.environ.clear()
            os.environ.update(saved)
            self.stack.down()

    def addr(self, component: str) -> str:
        return self.config.addr(component)

    def channel(self, component: str, timeout_s: float = 600.0):
        return grpc_client.channel(
            self.addr(component), default_timeout_s=timeout_s, token=self.token
        )

    def cpu_roots(self) -> list[int]:
        """This process (the stack's components are its children) and every component
        the stack's state file records, should one have been started by another."""
        state = json.loads(self.config.state_file.read_text())
        return [os.getpid(), *(int(c["pid"]) for c in state["components"].values() if c["pid"])]

    # --- uploads ------------------------------------------------------------------------
    def upload(self, pngs: list[bytes]) -> list[segmenter_pb2.UploadResponse]:
        """Upload ``pngs`` from three lab clients at once, each with its own channel,
        each its share in turn; returns the service's answers."""
        self._specimens += 1
        specimen = f"bench-{self._specimens}"
        shares = [pngs[i :: len(LABS)] for i in range(len(LABS))]

        def client(lab: str, share: list[bytes]) -> list[segmenter_pb2.UploadResponse]:
            with self.channel("segmenter", UPLOAD_DEADLINE_S) as ch:
                stub = segmenter_pb2_grpc.SegmenterStub(ch)
                return [stub.Upload(_requests(lab, specimen, png)) for png in share]

        with ThreadPoolExecutor(len(LABS)) as pool:
            answers = list(pool.map(client, LABS, shares))
        out = [a for share in answers for a in share]
        if any(a.duplicate for a in out):
            raise RuntimeError("a bench field was a duplicate: the segmenter did no work")
        return out

    def cell_rows(self) -> list:
        """Every cell of the bench labs, through the segmenter's ListCells."""
        with self.channel("segmenter", 60.0) as ch:
            stub = segmenter_pb2_grpc.SegmenterStub(ch)
            return [
                c
                for lab in LABS
                for c in paging.follow(
                    stub.ListCells,
                    segmenter_pb2.ListCellsRequest(lab=lab),
                    "cells",
                )
            ]

    def ensure_cells(self, count: int) -> list:
        """At least ``count`` segmented cells, uploading more fields when needed."""
        cells = self.cell_rows()
        while len(cells) < count:
            batch = len(LABS) * self.options.fields_per_client
            self.upload(self.fields.pngs(batch))
            cells = self.cell_rows()
            print(f"  {len(cells)} cells segmented (want {count})", flush=True)
        return sorted(cells, key=lambda c: c.cell_id)[:count]


def _requests(lab: str, specimen: str, png: bytes) -> Iterator[segmenter_pb2.UploadRequest]:
    yield segmenter_pb2.UploadRequest(
        header=segmenter_pb2.UploadHeader(
            lab=lab, specimen=specimen, diagnosis="normal", filename="bench.png"
        )
    )
    for i in range(0, len(png), CHUNK):
        yield segmenter_pb2.UploadRequest(chunk=png[i : i + CHUNK])


def _leave_ray() -> None:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
