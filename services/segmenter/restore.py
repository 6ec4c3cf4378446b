"""Cutting lost crops and masks again from their field, with the segmenter's own code.

A crop or a mask is stored under the sha256 of its PNG (``cells/ab/<sha256>.png`` and
``.mask.png``), so a re-cut is accepted only when it is that exact byte string: the
restored object is the lost one, never a plausible neighbour. Two ways, cheapest first:

* the crop is lost and its mask is still there: the mask is the cell's window of the
  field, so the window's origin is the cell's bounding box minus the mask's own (both
  hold exactly the cell's pixels); the crop is that window of the field with every
  pixel outside the cell white, as :func:`instances.cells_from` cuts it;
* otherwise the field is segmented again with the weights that segmented it
  (``field_images.segmenter``, e.g. ``unet-v1``), and the cell with the same
  ``index_in_field`` gives both.

What neither way reproduces byte for byte stays missing; the caller says so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch

from bmcell.storage import ObjectStore, digest_of_key, sha256_hex
from services.segmenter import images, instances, unet
from services.segmenter.models import load_named

Segment = Callable[[], list[instances.SegmentedCell]]


def recut(
    rgb: np.ndarray,
    cells: Iterable[Mapping],
    missing: set[str],
    *,
    crop_size: int,
    masks: Mapping[str, bytes],
    segment: Segment,
) -> dict[str, bytes]:
    """Verified bytes for every key in ``missing`` that can be cut again.

    ``cells`` are the field's cell rows (``index_in_field``, bbox, ``crop_key``,
    ``mask_key``); ``masks`` the stored masks of cells whose crop is lost (by mask key);
    ``segment`` segments the field again, called at most once and only when needed.
    """
    restored: dict[str, bytes] = {}
    pending = []
    for cell in cells:
        wanted = {cell["crop_key"], cell["mask_key"]} & missing
        if not wanted:
            continue
        mask = masks.get(cell["mask_key"])
        if wanted == {cell["crop_key"]} and mask is not None:
            crop = _crop_from_mask(rgb, cell, mask, crop_size)
            if crop is not None and _matches(cell["crop_key"], crop):
                restored[cell["crop_key"]] = crop
                continue
        pending.append((cell, wanted))
    if not pending:
        return restored
    by_index = {c.index: c for c in segment()}
    for cell, wanted in pending:
        again = by_index.get(cell["index_in_field"])
        if again is None:
            continue
        cut = {
            cell["crop_key"]: images.png_bytes(again.crop),
            cell["mask_key"]: images.png_bytes(again.mask),
        }
        for key in wanted:
            if _matches(key, cut[key]):
                restored[key] = cut[key]
    return restored


def recutter(store: ObjectStore, crop_size: int) -> Callable[[Mapping, list, set[str]], dict]:
    """:data:`bmcell.integrity.Recut` for ``bmcell storage check --repair``: the field
    image and the surviving masks come from storage (a lost field image raises
    NotFound), the weights are the ones named in the field's row."""
    models: dict[str, Callable[[np.ndarray, int], Segment]] = {}

    def run(field: Mapping, cells: list, lost: set[str]) -> dict[str, bytes]:
        rgb = images.read_png(store.get(field["object_key"]))
        masks = {
            c["mask_key"]: store.get(c["mask_key"])
            for c in cells
            if c["crop_key"] in lost and c["mask_key"] not in lost
        }
        bind = models.setdefault(field["segmenter"], segmenter_of(store, field["segmenter"]))
        return recut(
            rgb, cells, lost, crop_size=crop_size, masks=masks, segment=bind(rgb, crop_size)
        )

    return run


def segmenter_of(store: ObjectStore, model_name: str) -> Callable[[np.ndarray, int], Segment]:
    """``(rgb, crop_size) -> segment`` with the named weights, loaded on first use."""
    loaded: list[torch.nn.Module] = []

    def bind(rgb: np.ndarray, crop_size: int) -> Segment:
        def segment() -> list[instances.SegmentedCell]:
            if not loaded:
                model = load_named(store, model_name)
                if model is None:
                    return []  # the weights are gone too: nothing can be cut again
                # The graph the segmentation workers run, so the cut is theirs.
                loaded.append(unet.for_inference(model.network))
            probs = unet.predict_probabilities(loaded[0], rgb)
            labels, nuclei = instances.label_instances(probs)
            return instances.cells_from(rgb, labels, nuclei, crop_size)

        return segment

    return bind


def _crop_from_mask(
    rgb: np.ndarray, cell: Mapping, mask_png: bytes, crop_size: int
) -> bytes | None:
    mask = np.asarray(images.read_png(mask_png))
    if mask.shape != (crop_size, crop_size):
        return None
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    origin_x, origin_y = cell["x0"] - int(xs.min()), cell["y0"] - int(ys.min())
    half = crop_size // 2
    crop = instances.cut_window(rgb, origin_x + half, origin_y + half, crop_size, 0)
    crop[mask == 0] = instances.CROP_FILL
    return images.png_bytes(crop)


def _matches(key: str, data: bytes) -> bool:
    return digest_of_key(key) == sha256_hex(data)
