"""The field segmentation network: a small U-Net and how it learns from synthetic fields.

Every pixel gets one of four classes:

    0 background   (plasma and red cells)
    1 cytoplasm    (inside a nucleated cell, not its nucleus)
    2 nucleus      (the cell's visible nucleus)
    3 boundary     (the one-pixel rim of every cell at network resolution)

The boundary class is what separates touching cells: a cell's interior (cytoplasm or
nucleus, minus boundary) is one connected component per cell even where two cells
touch, so the interiors seed a watershed that grows back out into the whole
foreground (``services.segmenter.instances``).

The network runs at ``SCALE`` (0.5) of the field's resolution: a 704x704 field is
segmented as 352x352, where a neutrophil is still ~48 px across and the network is
four times cheaper. Inputs are white-balanced per image (each channel divided by its
bright background level) so a lab's stain and scanner matter less.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torch import nn
from torch.nn import functional as F

BACKGROUND, CYTOPLASM, NUCLEUS, BOUNDARY = 0, 1, 2, 3
CLASSES = ("background", "cytoplasm", "nucleus", "boundary")
SCALE = 0.5
ARCH = "unet4-16"


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Encoder-decoder with skip connections; input height and width divisible by 8."""

    MULTIPLE = 8

    def __init__(self, widths: tuple[int, ...] = (16, 32, 48, 64)) -> None:
        super().__init__()
        self.widths = widths
        self.down = nn.ModuleList()
        cin = 3
        for w in widths:
            self.down.append(_block(cin, w))
            cin = w
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for w_skip in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(cin, w_skip, 2, stride=2))
            self.merge.append(_block(2 * w_skip, w_skip))
            cin = w_skip
        self.head = nn.Conv2d(cin, len(CLASSES), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1]), strict=True):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def normalise(image: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 -> (3, h, w) float32, white-balanced on the bright background."""
    rgb = image.astype(np.float32)
    white = np.percentile(rgb.reshape(-1, 3), 95, axis=0).clip(32.0, None)
    out = (rgb / white.astype(np.float32) - 0.75) * 2.0
    return np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32)


def downscale(image: np.ndarray, scale: float = SCALE) -> np.ndarray:
    """Area-average resize of an RGB field to the network's resolution."""
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def class_targets(instances: np.ndarray, nuclei: np.ndarray, scale: float = SCALE) -> np.ndarray:
    """Per-pixel class at network resolution from full-resolution truth masks."""
    step = round(1 / scale)
    inst = instances[step // 2 :: step, step // 2 :: step]
    nuc = nuclei[step // 2 :: step, step // 2 :: step]
    grown = ndimage.maximum_filter(inst, size=3, mode="nearest")
    shrunk = ndimage.minimum_filter(inst, size=3, mode="nearest")
    rim = (inst > 0) & ((grown != inst) | (shrunk != inst))
    target = np.zeros(inst.shape, dtype=np.int64)
    target[inst > 0] = CYTOPLASM
    target[(nuc > 0) & (nuc == inst)] = NUCLEUS
    target[rim] = BOUNDARY
    return target


#: Serialises :func:`for_inference`.
_TRACING = threading.Lock()


def for_inference(model: UNet) -> torch.nn.Module:
    """The network as a frozen TorchScript graph optimised for inference (batch norm
    folded into the convolutions): ~20% faster on one CPU thread, the same logits to
    ~1e-5 and any input size (:func:`predict_probabilities` takes either).

    One trace at a time in a process: ``torch.jit.trace`` checks its graph by tracing
    again, and two threads tracing at once (the first uploads of a segmenter, or a
    re-cut, on gRPC's threads) get each other's value names and fail that check.
    """
    with _TRACING, torch.inference_mode():
        traced = torch.jit.trace(model.eval(), torch.zeros(1, 3, 64, 64))
        return torch.jit.optimize_for_inference(traced)


def predict_probabilities(
    model: torch.nn.Module, image: np.ndarray, scale: float = SCALE
) -> np.ndarray:
    """(h, w, 3) uint8 field -> (4, h, w) float32 class probabilities at full resolution."""
    h, w = image.shape[:2]
    small = normalise(downscale(image, scale))
    sh, sw = small.shape[1:]
    m = UNet.MULTIPLE
    ph, pw = (-sh) % m, (-sw) % m
    x = torch.from_numpy(small)[None]
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    with torch.inference_mode():
        logits = model(x)[:, :, :sh, :sw]
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return torch.softmax(logits, dim=1)[0].numpy()


@dataclass(frozen=True)
class TrainConfig:
    fields: int = 48
    epochs: int = 14
    labs: int = 8
    seed: int = 0
    size: int = 704
    patch: int = 128
    batch: int = 6
    lr: float = 3e-3
    threads: int = 2
    boundary_weight: float = 3.0


@dataclass(frozen=True)
class TrainReport:
    epochs: int
    fields: int
    seconds: float
    final_loss: float
    history: list[float]


def training_fields(cfg: TrainConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """(normalised image, class target) pairs at network resolution, from cfg.labs labs."""
    from bmcell.synth import lab_names, lab_style, render_field, specimen_mix
    from bmcell.synth.dataset import derived_rng

    names = lab_names(cfg.labs)
    out = []
    for i in range(cfg.fields):
        li = i % cfg.labs
        style = lab_style(cfg.seed, names[li])
        _, mix = specimen_mix(cfg.seed, li, i // cfg.labs)
        # Key 7 keeps these fields apart from generate_dataset's (keys 0-3).
        sample = render_field(derived_rng(cfg.seed, 7, li, i), style, mix, cfg.size)
        out.append(
            (normalise(downscale(sample.image)), class_targets(sample.instances, sample.nuclei))
        )
    return out


def _batch(
    data: list[tuple[np.ndarray, np.ndarray]], cfg: TrainConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for _ in range(cfg.batch):
        x, y = data[int(rng.integers(len(data)))]
        h, w = y.shape
        p = min(cfg.patch, h, w) // UNet.MULTIPLE * UNet.MULTIPLE
        top, left = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
        x, y = x[:, top : top + p, left : left + p], y[top : top + p, left : left + p]
        k = int(rng.integers(4))
        x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k)
        if rng.random() < 0.5:
            x, y = x[:, :, ::-1], y[:, ::-1]
        # Stain and exposure jitter beyond what the training labs cover.
        gain = rng.uniform(0.9, 1.1, (3, 1, 1)).astype(np.float32)
        shift = rng.uniform(-0.08, 0.08, (3, 1, 1)).astype(np.float32)
        xs.append(np.ascontiguousarray(x) * gain + shift)
        ys.append(np.ascontiguousarray(y))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def train(
    cfg: TrainConfig, progress: Callable[[int, int, float], None] | None = None
) -> tuple[UNet, TrainReport]:
    """Train from scratch on synthetic fields; an epoch is one patch batch per two fields."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    started = time.perf_counter()
    data = training_fields(cfg)
    model = UNet()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps_per_epoch = max(1, len(data) // 2)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch
    )
    weight = torch.tensor([1.0, 1.0, 1.0, cfg.boundary_weight])
    history = []
    model.train()
    for epoch in range(cfg.epochs):
        losses = []
        for _ in range(steps_per_epoch):
            x, y = _batch(data, cfg, rng)
            loss = F.cross_entropy(model(x), y, weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        history.append(float(np.mean(losses)))
        if progress is not None:
            progress(epoch + 1, cfg.epochs, history[-1])
    model.eval()
    report = TrainReport(
        cfg.epochs, cfg.fields, time.perf_counter() - started, history[-1], history
    )
    return model, report


def to_bytes(model: UNet, meta: dict) -> bytes:
    """Weights as half precision (the file stays well under 2 MB) plus metadata."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save({"arch": ARCH, "widths": list(model.widths), "state": state, "meta": meta}, buf)
    return buf.getvalue()


def from_bytes(data: bytes) -> tuple[UNet, dict]:
    blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if blob.get("arch") != ARCH:
        raise ValueError(f"weights are for {blob.get('arch')!r}, this code runs {ARCH!r}")
    model = UNet(tuple(blob["widths"]))
    model.load_state_dict({k: v.float() for k, v in blob["state"].items()})
    model.eval()
    return model, dict(blob.get("meta", {}))
