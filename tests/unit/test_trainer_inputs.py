"""The workers' in-memory inputs (services/trainer/loop.py ``Inputs``): the numbers the
classifier's preprocessing gives, from the packed uint8 thumbs the driver stages."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from bmcell import preprocess, thumbs
from bmcell.synth import crop_rng, lab_style, render_crop
from services.trainer import runner
from services.trainer.loop import Inputs, as_input


def some_thumbs(n: int = 6, size: int = 32) -> np.ndarray:
    crops = [
        render_crop(crop_rng(1, "lab-a", "Seg", i), lab_style(1, "lab-a"), "Seg", 96)[0]
        for i in range(n)
    ]
    return np.stack([preprocess.crop_to_uint8(c, size) for c in crops])


def test_a_batch_is_the_classifier_preprocessing_bit_for_bit() -> None:
    pixels = some_thumbs()
    inputs = Inputs(pixels)
    idx = [4, 0, 4, 2]
    batch = inputs.batch(torch.tensor(idx))
    assert batch.dtype == torch.float32 and batch.shape == (4, 3, 32, 32)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(batch.numpy(), thumbs.to_batch(pixels[idx]))
    x = as_input(batch)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, batch)


def test_inputs_refuse_anything_but_uint8_rgb() -> None:
    with pytest.raises(ValueError, match="uint8"):
        Inputs(some_thumbs().astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        Inputs(some_thumbs()[..., :2])


class MemoryStore:
    """The two calls staging uses, in memory (what ObjectStore does over S3 is tested
    by the integration tests)."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put(self, key: str, data: bytes, content_type: str = "") -> None:
        self.objects[key] = data

    def get(self, key: str) -> bytes:
        return self.objects[key]


def test_staged_inputs_load_back_and_a_wrong_shape_is_refused() -> None:
    from services.trainer.loop import load_inputs

    store = MemoryStore()
    pixels = some_thumbs(5)
    key = runner.stage_inputs(store, "train-x", pixels)
    assert key == runner.inputs_key("train-x") and key.startswith(runner.control_prefix("train-x"))
    assert np.load(io.BytesIO(store.objects[key])).shape == (5, 32, 32, 3)
    loaded = load_inputs(store, key, 5, 32)
    np.testing.assert_array_equal(loaded.pixels.numpy(), pixels)
    with pytest.raises(ValueError, match=r"needs \(6, 32, 32, 3\)"):
        load_inputs(store, key, 6, 32)
