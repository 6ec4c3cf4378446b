"""Segmenter: 704x704 fields from 3 concurrent lab clients, through the service and in
this process.

- ``service``: upload + segmentation through the segmenter service, three lab
  clients at once (``BenchStack.upload``): transfer, decode, the U-Net,
  post-processing, crops, thumbs, object storage and the database rows.
- ``in-process``: the same field PNGs, three threads at once, each field decoded
  with the service's decoder and segmented by the service's own pipeline
  (``services.segmenter.restore.segmenter_of``, what a duplicate upload re-cuts
  with), its crops and masks PNG-encoded as the service does before it stores
  them; nothing is stored. Torch threads: the service's ``BMCELL_TORCH_THREADS``.

An item is a field; a pass is ``3 x fields_per_client`` fields. The fields are
fresh copies (+-1 noise) of a few rendered ones, made before the pass is timed.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch

from bench import flops
from bench.context import FIELD_SIZE, LABS, BenchStack
from bench.harness import Arm, ArmResult, CpuMeter, Sample, run_alternated
from bmcell.settings import SegmenterSettings, load
from services.segmenter import images, models, restore

NAME = "segmenter"


def _settings() -> SegmenterSettings:
    return load(SegmenterSettings)


def run(ctx: BenchStack, meter: CpuMeter) -> list[ArmResult]:
    opts = ctx.options
    settings = _settings()
    per_pass = len(LABS) * opts.fields_per_client
    loaded = models.load_latest(ctx.store, settings.segmenter_model)
    if loaded is None:
        raise RuntimeError(f"no segmenter weights {settings.segmenter_model!r} in object storage")
    segment_with = restore.segmenter_of(ctx.store, loaded.name)
    pending: list[bytes] = []

    def prepare() -> None:
        pending[:] = ctx.fields.pngs(per_pass)

    def service() -> Sample:
        started = time.perf_counter()
        answers = ctx.upload(pending)
        seconds = time.perf_counter() - started
        return Sample(len(answers), seconds, extra={"cells": sum(a.cells for a in answers)})

    def segment_one(png: bytes) -> int:
        field = images.decode(
            png,
            max_bytes=min(settings.max_upload_bytes, settings.max_image_bytes),
            max_pixels=settings.max_image_pixels,
            max_frames=settings.max_image_frames,
        )
        cells = segment_with(field.rgb, settings.crop_size)()
        for c in cells:
            images.png_bytes(c.crop)
            images.png_bytes(c.mask)
        return len(cells)

    def in_process() -> Sample:
        torch.set_num_threads(settings.torch_threads)
        started = time.perf_counter()
        with ThreadPoolExecutor(len(LABS)) as pool:
            counts = list(pool.map(segment_one, pending))
        seconds = time.perf_counter() - started
        return Sample(len(counts), seconds, extra={"cells": sum(counts)})

    per_field = flops.segmenter_field(FIELD_SIZE)
    arms = [
        Arm(NAME, "service", "fields", per_field, service, prepare, "3 lab clients"),
        Arm(NAME, "in-process", "fields", per_field, in_process, prepare, "3 threads"),
    ]
    for arm in arms:  # weights loaded and every path warm before anything is timed
        prepare()
        arm.run_pass()
    return run_alternated(arms, opts.rounds, opts.seconds, meter)
