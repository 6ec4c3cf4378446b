"""Labelled cells in and out of bmcell: ImageFolder trees, folder-name mappings, crops.

An ImageFolder is ``DIR/<class name>/<image>`` (a CellaVision DM96/DI-60 export, the
Munich bone marrow set, another lab's bmcell export). A class name maps to a taxonomy
code through a mapping file (YAML, ``name: CODE``); a name equal to a code maps to it
without one. Every crop brought in is fitted into the segmenter's crop frame the way
the segmenter would have cut it: resized keeping its aspect ratio, centred, the rest
filled with the segmenter's crop fill colour, and re-encoded as a metadata-free PNG
(:func:`bmcell.images.png_bytes`), so EXIF, ICC profiles and text chunks never enter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from bmcell.errors import InvalidArgument
from bmcell.taxonomy import Taxonomy

#: The segmenter's fill outside a cell (services.segmenter.instances.CROP_FILL).
CROP_FILL = (255, 255, 255)
#: Mask values of the segmenter: an imported crop's image area counts as cell.
MASK_CELL = 128
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclass(frozen=True)
class Fitted:
    crop: np.ndarray  # (size, size, 3) uint8
    mask: np.ndarray  # (size, size) uint8: MASK_CELL where the image is, 0 in the padding
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the image inside the frame


def fit_into_frame(rgb: np.ndarray, size: int) -> Fitted:
    """``rgb`` scaled to fit a ``size`` square keeping its aspect ratio (down or up;
    Lanczos), centred, padded with :data:`CROP_FILL`."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"a crop is uint8 (h, w, 3), got {rgb.dtype} {rgb.shape}")
    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) != (w, h):
        rgb = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.Resampling.LANCZOS))
    x0, y0 = (size - nw) // 2, (size - nh) // 2
    crop = np.empty((size, size, 3), dtype=np.uint8)
    crop[...] = CROP_FILL
    crop[y0 : y0 + nh, x0 : x0 + nw] = rgb
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[y0 : y0 + nh, x0 : x0 + nw] = MASK_CELL
    return Fitted(crop, mask, (x0, y0, x0 + nw, y0 + nh))


def parse_mapping(text: str, *, source: str = "mapping") -> dict[str, str]:
    """A mapping file's ``folder name -> class code`` pairs; errors name the line."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise InvalidArgument(f"{source}{where}: not YAML ({exc})", field="map") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidArgument(
            f"{source}: expected lines of 'folder name: CODE', got {type(data).__name__}",
            field="map",
        )
    lines = {str(k): n + 1 for n, k in _keys_by_line(text)}
    out: dict[str, str] = {}
    for name, code in data.items():
        if not isinstance(code, str) or not code.strip():
            line = lines.get(str(name))
            where = f" line {line}" if line else ""
            raise InvalidArgument(
                f"{source}{where}: {name!r} maps to {code!r}, not a class code", field="map"
            )
        out[str(name)] = code.strip()
    return out


def _keys_by_line(text: str) -> list[tuple[int, str]]:
    found = []
    for n, line in enumerate(text.splitlines()):
        key, sep, _ = line.partition(":")
        if sep and key.strip() and not key.lstrip().startswith("#"):
            found.append((n, key.strip().strip("'\"")))
    return found


def resolve_classes(
    names: list[str], mapping: dict[str, str], taxonomy: Taxonomy
) -> dict[str, str]:
    """Each folder name's class code. Unmapped names, and mappings to codes the
    taxonomy lacks, are refused together, every one listed, before anything is read."""
    codes = set(taxonomy.codes)
    unmapped = sorted(n for n in names if n not in mapping and n not in codes)
    unknown = sorted({mapping[n] for n in names if n in mapping and mapping[n] not in codes})
    problems = []
    if unmapped:
        problems.append(f"folder names with no class code: {', '.join(unmapped)}")
    if unknown:
        problems.append(f"mapped to codes not in taxonomy {taxonomy.name!r}: {', '.join(unknown)}")
    if problems:
        raise InvalidArgument(
            "; ".join(problems) + f" (codes: {', '.join(taxonomy.codes)})", field="map"
        )
    return {n: mapping.get(n, n) for n in names}


@dataclass(frozen=True)
class FolderFile:
    class_name: str
    path: Path


def scan_imagefolder(root: Path) -> tuple[list[str], list[FolderFile], list[Path]]:
    """(class folder names, image files by class then name, other files skipped)."""
    if not root.is_dir():
        raise InvalidArgument(f"{root} is not a directory", field="dir")
    names: list[str] = []
    files: list[FolderFile] = []
    skipped: list[Path] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        names.append(folder.name)
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            if path.suffix.lower() in IMAGE_SUFFIXES:
                files.append(FolderFile(folder.name, path))
            else:
                skipped.append(path)
    return names, files, skipped
