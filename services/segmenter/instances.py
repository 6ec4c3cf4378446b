"""From class probabilities to cells: instances, nuclei, morphometrics and crops.

Instance separation: the interior of every cell (cytoplasm or nucleus, minus the
boundary class) is where the network says a cell is and is not at its rim, so
touching cells are split by the rim pixels the network does find. Where it misses
part of a rim, two cells still show as two "hills" of the interior's distance to
its edge: every regional maximum at least ``SEED_H`` px higher than its
surroundings (on the distance smoothed with ``SEED_SIGMA``) seeds a watershed of
the negated distance, restricted to the foreground (anything not background), which
also hands every rim pixel to its cell (the maxima are found on the distance's
2x2 block maxima: 6x cheaper than at full resolution, the same seeds; the
watershed and all after it stay at full resolution). Instances smaller than
``MIN_CELL_AREA`` are dropped (a sliver of a cell at the border). SEED_H was chosen on the synthetic
fields of labs and a seed the network never saw in training (docs/segmenter.md).

Morphometrics (pixels of the field image):

- cell area, nucleus area and their ratio;
- nucleus axis ratio: major over minor axis of the ellipse with the nucleus' second
  moments (``skimage.measure.regionprops``); >= 1;
- nucleus narrowest/widest width ratio: the width at a point of the nucleus'
  skeleton is twice its distance to the nucleus edge; the ratio is the minimum of
  that width over the skeleton divided by the widest width. Skeleton spurs (which run
  out to the edge, where the distance falls to zero) are pruned first by removing
  end points as many times as the widest half-width. A nucleus drawn as separate
  pieces (lobes whose joining filament is thinner than a pixel) has ratio 0.
  A round nucleus is 1, a band above 1/3, a segmented nucleus below it (JSLH).

Cells without a visible nucleus get nucleus area, axis ratio and width ratio 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.measure import regionprops
from skimage.morphology import h_maxima, skeletonize
from skimage.segmentation import watershed

from services.segmenter.unet import BACKGROUND, BOUNDARY, CYTOPLASM, NUCLEUS

SEED_H = 12.0
SEED_SIGMA = 2.0
MIN_CELL_AREA = 300
# Same as bmcell.synth.render_crop (CROP_FILL) and bmcell.preprocess: the
# extracellular area of a crop is white.
CROP_FILL = (255, 255, 255)
MASK_CELL, MASK_NUCLEUS = 128, 255


@dataclass(frozen=True)
class Morphometrics:
    cell_area: float
    nucleus_area: float
    nucleus_cell_ratio: float
    nucleus_axis_ratio: float
    nucleus_width_ratio: float


@dataclass(frozen=True)
class SegmentedCell:
    index: int
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1; x1, y1 exclusive
    touches_border: bool
    morphometrics: Morphometrics
    crop: np.ndarray  # (crop, crop, 3) uint8, outside the cell set to CROP_FILL
    mask: np.ndarray  # (crop, crop) uint8: 0 outside, MASK_CELL cytoplasm, MASK_NUCLEUS nucleus


def label_instances(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(4, h, w) probabilities -> (instances, nuclei) int32 maps; 0 is background."""
    cls = probs.argmax(axis=0)
    foreground = cls != BACKGROUND
    interior = (cls == CYTOPLASM) | (cls == NUCLEUS)
    depth = ndimage.gaussian_filter(ndimage.distance_transform_edt(interior), SEED_SIGMA)
    instances = watershed(-depth, markers=seeds_of(depth), mask=foreground).astype(np.int32)
    sizes = np.bincount(instances.ravel())
    keep = sizes >= MIN_CELL_AREA
    keep[0] = False
    remap = np.zeros(len(sizes), dtype=np.int32)
    remap[keep] = np.arange(1, int(keep.sum()) + 1)
    instances = remap[instances]
    nucleus_px = (cls == NUCLEUS) | ((cls == BOUNDARY) & (probs[NUCLEUS] > probs[CYTOPLASM]))
    nuclei = np.where(nucleus_px, instances, 0).astype(np.int32)
    return instances, nuclei


def seeds_of(depth: np.ndarray) -> np.ndarray:
    """Labelled watershed markers: the ``SEED_H`` regional maxima of ``depth``, found on
    its 2x2 block maxima (``h_maxima`` costs ~6x more at full resolution, and the
    smoothed distance has no two hills within a block) and drawn back as those blocks."""
    h, w = depth.shape
    padded = np.pad(depth, ((0, h % 2), (0, w % 2)), mode="edge")
    blocks = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2).max(axis=(1, 3))
    seeds, _ = ndimage.label(h_maxima(blocks, SEED_H))
    return seeds.repeat(2, axis=0).repeat(2, axis=1)[:h, :w]


def width_ratio(nucleus: np.ndarray) -> float:
    """Narrowest over widest width along the pruned skeleton (see the module doc)."""
    if not nucleus.any():
        return 0.0
    _, pieces = ndimage.label(nucleus)
    if pieces > 1:
        sizes = np.bincount(ndimage.label(nucleus)[0].ravel())[1:]
        if (sizes >= 0.1 * sizes.sum()).sum() > 1:
            return 0.0
        nucleus = ndimage.label(nucleus)[0] == int(sizes.argmax()) + 1
    padded = np.pad(nucleus, 1)
    dist = ndimage.distance_transform_edt(padded)
    skeleton = skeletonize(padded)
    widest = float(dist.max())
    for _ in range(int(np.ceil(widest))):
        ends = skeleton & (_neighbours(skeleton) <= 1)
        if ends.sum() == skeleton.sum():
            break
        skeleton = skeleton & ~ends
    along = dist[skeleton]
    if along.size == 0:
        return 1.0
    return float(np.clip(along.min() / widest, 0.0, 1.0))


def _neighbours(mask: np.ndarray) -> np.ndarray:
    """How many of each pixel's 8 neighbours are set (outside the array: unset)."""
    h, w = mask.shape
    padded = np.pad(mask, 1).astype(np.uint8)
    total = np.zeros((h, w), dtype=np.uint8)
    for dy in range(3):
        for dx in range(3):
            if dy != 1 or dx != 1:
                total += padded[dy : dy + h, dx : dx + w]
    return total


def measure(cell: np.ndarray, nucleus: np.ndarray) -> Morphometrics:
    cell_area = float(cell.sum())
    nucleus_area = float(nucleus.sum())
    if nucleus_area == 0:
        return Morphometrics(cell_area, 0.0, 0.0, 0.0, 0.0)
    props = regionprops(nucleus.astype(np.uint8))[0]
    minor = props.axis_minor_length
    axis = props.axis_major_length / minor if minor > 0 else 1.0
    return Morphometrics(
        cell_area,
        nucleus_area,
        min(nucleus_area / cell_area, 1.0),
        max(float(axis), 1.0),
        width_ratio(nucleus),
    )


def cut_window(array: np.ndarray, cx: int, cy: int, size: int, fill: object) -> np.ndarray:
    """A size x size window centred on (cx, cy); outside the field is ``fill``."""
    h, w = array.shape[:2]
    out = np.empty((size, size, *array.shape[2:]), dtype=array.dtype)
    out[...] = fill
    x0, y0 = cx - size // 2, cy - size // 2
    fx0, fy0, fx1, fy1 = max(x0, 0), max(y0, 0), min(x0 + size, w), min(y0 + size, h)
    if fx0 < fx1 and fy0 < fy1:
        out[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0] = array[fy0:fy1, fx0:fx1]
    return out


def cells_from(
    image: np.ndarray, instances: np.ndarray, nuclei: np.ndarray, crop_size: int
) -> list[SegmentedCell]:
    """One record per instance, in label order, with its crop and mask."""
    h, w = instances.shape
    out = []
    for i, box in enumerate(ndimage.find_objects(instances)):
        if box is None:
            continue
        label = i + 1
        ys, xs = box
        cell = instances[box] == label
        nucleus = nuclei[box] == label
        bbox = (xs.start, ys.start, xs.stop, ys.stop)
        touches = xs.start == 0 or ys.start == 0 or xs.stop == w or ys.stop == h
        cy, cx = ndimage.center_of_mass(cell)
        cx, cy = int(round(xs.start + cx)), int(round(ys.start + cy))
        # Windows of the label maps, compared after: the field-sized comparisons cost
        # more than the rest of a cell.
        inside = cut_window(instances, cx, cy, crop_size, 0) == label
        crop = cut_window(image, cx, cy, crop_size, 0)
        crop[~inside] = CROP_FILL
        mask = np.where(inside, MASK_CELL, 0).astype(np.uint8)
        mask[cut_window(nuclei, cx, cy, crop_size, 0) == label] = MASK_NUCLEUS
        out.append(SegmentedCell(len(out), bbox, bool(touches), measure(cell, nucleus), crop, mask))
    return out
