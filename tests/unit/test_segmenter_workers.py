"""Segmentation in worker processes: the same cells as in the caller's thread, and a
worker that dies costs one upload UNAVAILABLE, not the service."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from skimage.morphology import h_maxima

from bmcell.errors import Unavailable
from bmcell.synth import lab_style, render_field, specimen_mix
from services.segmenter import instances, workers

WEIGHTS = sorted((Path(__file__).resolve().parents[2] / "services/segmenter/weights").glob("*.pt"))


def _field(seed: int, size: int = 256) -> np.ndarray:
    _, mix = specimen_mix(3, 0, 0)
    return render_field(np.random.default_rng(seed), lab_style(3, "lab-b"), mix, size).image


def _pool(n: int) -> workers.SegmentPool:
    return workers.SegmentPool(
        WEIGHTS[-1].read_bytes(), workers=n, threads=1, timeout_s=120, seconds_per_megapixel=0
    )


def test_workers_cut_what_the_calling_thread_cuts_and_survive_a_dead_worker():
    fields = [_field(1), _field(2, 200)]
    local, pool = _pool(0), _pool(1)
    try:
        for rgb in fields:
            here, there = local.segment(rgb, 96), pool.segment(rgb, 96)
            assert there.cells, "the synthetic field has cells"
            assert [c.bbox for c in there.cells] == [c.bbox for c in here.cells]
            assert there.encoded == here.encoded  # the PNGs, byte for byte
            assert there.field_png == here.field_png
        for process in list(pool._pool._processes.values()):
            os.kill(process.pid, signal.SIGKILL)
        with pytest.raises(Unavailable, match="worker died"):
            pool.segment(fields[0], 96)
        again = pool.segment(fields[0], 96)  # a fresh pool
        assert [c.bbox for c in again.cells] == [c.bbox for c in local.segment(fields[0], 96).cells]
    finally:
        pool.close()


def test_seeds_are_the_regional_maxima_at_full_resolution():
    """On fields' cell interiors (truth, rims between touching cells removed), the
    maxima found on 2x2 blocks are the full-resolution ones, one block seed each."""
    _, mix = specimen_mix(3, 0, 0)
    for seed, size in ((1, 400), (2, 353)):
        sample = render_field(np.random.default_rng(seed), lab_style(3, "lab-c"), mix, size)
        inst = sample.instances
        inside = (ndimage.minimum_filter(inst, 3) == ndimage.maximum_filter(inst, 3)) & (inst > 0)
        depth = ndimage.gaussian_filter(
            ndimage.distance_transform_edt(inside), instances.SEED_SIGMA
        )
        seeds = instances.seeds_of(depth)
        assert seeds.shape == inst.shape
        full, count = ndimage.label(h_maxima(depth, instances.SEED_H))
        assert count >= 2
        assert seeds.max() == count
        assert sorted({int(seeds[full == i].max()) for i in range(1, count + 1)}) == list(
            range(1, count + 1)
        )


def test_neighbour_count_is_the_3x3_sum_less_the_pixel():
    mask = np.random.default_rng(1).random((23, 17)) > 0.6
    expected = ndimage.convolve(mask.astype(np.int32), np.ones((3, 3), np.int32), mode="constant")
    assert (instances._neighbours(mask)[mask] == (expected - 1)[mask]).all()
