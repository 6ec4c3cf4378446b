"""Fields segmented in worker processes, one torch thread each.

Segmentation is CPU work in Python and C extensions that mostly hold the GIL
(scipy.ndimage, skimage), so threads of one process share one core for it, and two
torch threads per process on this machine's two shared cores only contend. The
service can therefore hand each field to one of ``BMCELL_SEGMENTER_WORKERS`` processes
(started with ``spawn``: the gRPC server's threads make ``fork`` unsafe), each with
its own copy of the weights as a TorchScript graph optimised for inference and
``torch.set_num_threads(BMCELL_TORCH_THREADS)``. A worker returns everything the
upload stores that costs CPU: the field's PNG, the cells with their crops and masks,
and the crops' and masks' PNGs. 0 workers (the default: it measured faster on the
shared machine, docs/segmenter.md) segments in the calling thread with the same code.

A worker that dies (killed for memory) breaks its pool: the upload that saw it gets
UNAVAILABLE, having written nothing, and the next upload starts a fresh pool. So does
one that runs past its deadline (``BMCELL_SEGMENT_TIMEOUT_S`` plus
``BMCELL_SEGMENT_SECONDS_PER_MEGAPIXEL`` for each million pixels of the field):
its worker is stopped, since it cannot be interrupted. Workers ignore SIGTERM and
SIGINT (the stack signals a service's whole process group): the service finishes its
uploads, then closes the pool; should it die instead, the pool's pipes close and the
workers exit with it.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np
import torch

from bmcell import log
from bmcell.errors import Unavailable
from services.segmenter import images, instances, unet

_LOG = log.get(__name__)


@dataclass(frozen=True)
class Segmented:
    field_png: bytes
    cells: list[instances.SegmentedCell]
    encoded: list[tuple[bytes, bytes]]  # (crop PNG, mask PNG) of each cell, in order
    seconds: float  # network, instances, morphometrics and crops (not the PNGs)


def segment(network: torch.nn.Module, rgb: np.ndarray, crop_size: int) -> Segmented:
    """One field, start to stored bytes (in whichever process runs it)."""
    started = time.perf_counter()
    probs = unet.predict_probabilities(network, rgb)
    labels, nuclei = instances.label_instances(probs)
    cells = instances.cells_from(rgb, labels, nuclei, crop_size)
    seconds = time.perf_counter() - started
    encoded = [(images.png_bytes(c.crop), images.png_bytes(c.mask)) for c in cells]
    return Segmented(images.png_bytes(rgb, fast=True), cells, encoded, seconds)


# --- in a worker process -------------------------------------------------------------

_network: torch.nn.Module | None = None


def _start_worker(weights: bytes, threads: int) -> None:
    global _network
    # The stack stops a service by signalling its whole process group: the service
    # finishes its uploads (they need their workers), then closes the pool.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    _network = unet.for_inference(unet.from_bytes(weights)[0])


def _segment_in_worker(rgb: np.ndarray, crop_size: int) -> Segmented:
    assert _network is not None, "worker started without weights"
    return segment(_network, rgb, crop_size)


def _ready() -> bool:
    return _network is not None


# --- in the service ------------------------------------------------------------------


class SegmentPool:
    """``workers`` processes segmenting with ``weights``; 0: in the calling thread."""

    def __init__(
        self,
        weights: bytes,
        *,
        workers: int,
        threads: int,
        timeout_s: float,
        seconds_per_megapixel: float,
    ) -> None:
        self._weights = weights
        self._workers = workers
        self._threads = threads
        self._timeout_s = timeout_s
        self._per_megapixel = seconds_per_megapixel
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._local: torch.nn.Module | None = None
        if workers == 0:
            torch.set_num_threads(threads)
            self._local = unet.for_inference(unet.from_bytes(weights)[0])

    def start(self) -> None:
        """Start every worker now (loading torch and the weights takes seconds), so the
        first uploads do not wait for it; returns without waiting."""
        if self._workers:
            pool = self._current()
            for _ in range(self._workers):
                pool.submit(_ready)

    def segment(self, rgb: np.ndarray, crop_size: int) -> Segmented:
        if self._local is not None:
            return segment(self._local, rgb, crop_size)
        pool = self._current()
        deadline = self._timeout_s + self._per_megapixel * rgb.shape[0] * rgb.shape[1] / 1e6
        try:
            return pool.submit(_segment_in_worker, rgb, crop_size).result(timeout=deadline)
        except BrokenProcessPool as exc:
            self._replace(pool, "a segmentation worker died")
            raise Unavailable("a segmentation worker died; send the field again") from exc
        except FutureTimeout as exc:
            self._replace(pool, f"segmentation ran past its {deadline:.0f} s deadline")
            raise Unavailable(
                f"segmentation ran past its {deadline:.0f} s deadline (BMCELL_SEGMENT_TIMEOUT_S)"
            ) from exc

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _current(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self._workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start_worker,
                    initargs=(self._weights, self._threads),
                )
            return self._pool

    def _replace(self, pool: ProcessPoolExecutor, why: str) -> None:
        """Drop a broken or stuck pool; the next upload starts a fresh one. Its
        processes are stopped: a stuck one would hold a core, and the executor has no
        public way to stop a running task."""
        with self._lock:
            if self._pool is pool:
                self._pool = None
        _LOG.warning("replacing the segmentation workers", reason=why)
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
