"""Versioned segmentation weights in object storage.

Weights live in the data bucket as ``segmenter/<name>-v<N>.pt`` (``<name>`` is
``BMCELL_SEGMENTER_MODEL``, "unet" by default); a new training run publishes N+1 and
a starting service loads the highest N. The repository carries small pretrained
weights (``services/segmenter/weights/``, how they were made is in
``docs/segmenter.md``); a service that finds no weights in storage seeds them as v1,
so a fresh stack segments without a training run.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from bmcell.errors import FailedPrecondition
from bmcell.storage import ObjectStore
from services.segmenter import unet

PREFIX = "segmenter/"
BUNDLED = Path(__file__).resolve().parent / "weights"
NO_MODEL = "no segmentation model: run `bmcell segmenter train`"


@dataclass(frozen=True)
class LoadedModel:
    name: str  # e.g. unet-v3, recorded with every field it segmented
    network: unet.UNet
    meta: dict
    weights: bytes  # the stored file: what segmentation workers load


def _key(name: str, version: int) -> str:
    return f"{PREFIX}{name}-v{version}.pt"


def versions(store: ObjectStore, name: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(PREFIX + name)}-v(\d+)\.pt$")
    found = (pattern.match(key) for key in store.list(f"{PREFIX}{name}-v"))
    return sorted(int(m.group(1)) for m in found if m)


def publish(store: ObjectStore, name: str, data: bytes) -> str:
    """Store weights as the next version; returns the object key."""
    unet.from_bytes(data)  # refuse to publish what cannot be loaded
    existing = versions(store, name)
    key = _key(name, (existing[-1] if existing else 0) + 1)
    store.put(key, data)
    return key


def seed_bundled(store: ObjectStore, name: str) -> str | None:
    """Upload the repository's pretrained weights as v1 when storage has none."""
    if versions(store, name):
        return None
    bundled = sorted(BUNDLED.glob(f"{name}-v*.pt"))
    if not bundled:
        return None
    key = _key(name, 1)
    store.put(key, bundled[-1].read_bytes())
    return key


def load_latest(store: ObjectStore, name: str) -> LoadedModel | None:
    found = versions(store, name)
    if not found:
        return None
    data = store.get(_key(name, found[-1]))
    network, meta = unet.from_bytes(data)
    return LoadedModel(f"{name}-v{found[-1]}", network, meta, data)


def load_named(store: ObjectStore, model: str) -> LoadedModel | None:
    """The weights recorded with a field (``unet-v3``), or None when they are gone."""
    m = re.match(r"^(.+)-v(\d+)$", model)
    if m is None:
        return None
    key = _key(m.group(1), int(m.group(2)))
    if not store.exists(key):
        return None
    data = store.get(key)
    network, meta = unet.from_bytes(data)
    return LoadedModel(model, network, meta, data)


class ModelHolder:
    """The model a service segments with; None until weights exist."""

    def __init__(self, model: LoadedModel | None, threads: int) -> None:
        self._model = model
        self._lock = threading.Lock()
        torch.set_num_threads(threads)

    def get(self) -> LoadedModel:
        with self._lock:
            if self._model is None:
                raise FailedPrecondition(NO_MODEL)
            return self._model

    def set(self, model: LoadedModel) -> None:
        with self._lock:
            self._model = model
