"""One worker's training loop in-process, before and after the input path changed, alternated.

No Ray and no S3 server (for a machine too loaded to start them; the Ray figures come
from ``scripts/measure_trainer.py``). Arm "before": the merge base's ``CropCache``
(PNG decode per cell on first use, float tensors kept, NCHW). Arm "after": this
tree's ``loop.Inputs`` (uint8 thumbs, batches converted on the fly, ``channels_last``).
Same crops, seeds, batch (16), augmentation, one intra-op thread. Reported per arm:
samples per CPU-second (``time.process_time``, so a loaded machine's waiting is not
counted) of the first epoch (which decodes every crop in the "before" arm) and the
median of the later ones, with the load average.
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bmcell import preprocess
from bmcell.network import CellClassifier
from bmcell.stack.config import REPO
from bmcell.synth import crop_rng, lab_style, render_crop
from bmcell.taxonomy import DEFAULT_TAXONOMY
from services.trainer.augment import augment, seeded_generator
from services.trainer.loop import CROP_BACKGROUND, Inputs, as_input


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class DictStore:
    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def get(self, key: str) -> bytes:
        return self.objects[key]


def before_loop(rev: str):
    src = subprocess.check_output(["git", "show", f"{rev}:services/trainer/loop.py"], cwd=REPO)
    mod = types.ModuleType("bmcell_trainer_loop_before")
    sys.modules[mod.__name__] = mod
    exec(compile(src, f"{rev}:services/trainer/loop.py", "exec"), mod.__dict__)
    return mod


def epochs(arm: str, batch_of, n: int, n_epochs: int, bs: int) -> list[float]:
    torch.manual_seed(0)
    model = CellClassifier(DEFAULT_TAXONOMY.num_classes)
    if arm == "after":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    labels = torch.arange(n) % DEFAULT_TAXONOMY.num_classes
    rates = []
    for epoch in range(1, n_epochs + 1):
        started = time.process_time()
        order = torch.randperm(n, generator=seeded_generator(epoch))
        gen = seeded_generator(1000 + epoch)
        model.train()
        for start in range(0, n, bs):
            idx = order[start : start + bs]
            x = augment(batch_of(idx), gen, fill=CROP_BACKGROUND)
            if arm == "after":
                x = as_input(x)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rates.append(n / (time.process_time() - started))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--input-size", type=int, default=64)
    ap.add_argument("--before", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rev = (
        args.before
        or subprocess.check_output(
            ["git", "merge-base", "HEAD", "main"], cwd=REPO, text=True
        ).strip()
    )
    old = before_loop(rev)
    objects, images = {}, []
    for code in DEFAULT_TAXONOMY.codes:
        for i in range(args.per_class):
            image, _ = render_crop(crop_rng(5, "lab-a", code, i), lab_style(5, "lab-a"), code, 282)
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            objects[f"cells/{code}-{i}.png"] = buf.getvalue()
            images.append(image)
    keys = list(objects)
    pixels = np.stack([preprocess.crop_to_uint8(c, args.input_size) for c in images])
    n = len(keys)
    print(f"{n} crops (282 px) at {args.input_size} px, batch 16, 1 thread; before = {rev[:10]}")
    results: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
    for rep in range(args.repeats):
        for arm in ("before", "after"):
            load = loadavg()
            if arm == "before":
                cache = old.CropCache(DictStore(objects), args.input_size)

                def batch_of(idx, cache=cache):
                    return cache.batch([keys[i] for i in idx])
            else:
                inputs = Inputs(pixels)
                batch_of = inputs.batch
            rates = epochs(arm, batch_of, n, args.epochs, 16)
            later = statistics.median(rates[1:] or rates)
            results[arm].append((rates[0], later))
            print(
                f"{arm:6s} #{rep}: first epoch {rates[0]:6.1f} samples/CPU-s, later {later:6.1f} "
                f"samples/CPU-s, load {load} -> {loadavg()}",
                flush=True,
            )
    b = statistics.median(r[1] for r in results["before"])
    a = statistics.median(r[1] for r in results["after"])
    b1 = statistics.median(r[0] for r in results["before"])
    a1 = statistics.median(r[0] for r in results["after"])
    print(f"later epochs: after / before x{a / b:.2f}; first epoch: x{a1 / b1:.2f}")


if __name__ == "__main__":
    main()
