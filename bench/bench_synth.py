"""Generation speed of the synthetic specimen generator (``make bench``)."""

from __future__ import annotations

import tempfile
import time

import numpy as np

from bmcell.synth import class_mix, crop_rng, generate_dataset, lab_style, render_crop, render_field


def _rate(count: int, fn) -> float:  # noqa: ANN001 - any zero-argument callable
    start = time.perf_counter()
    for _ in range(count):
        fn()
    return count / (time.perf_counter() - start)


def main() -> None:
    lab = lab_style(0, "lab-a")
    mix = class_mix("normal")
    rng = np.random.default_rng(0)
    for size, count in ((704, 20), (352, 40)):
        rate = _rate(count, lambda size=size: render_field(rng, lab, mix, size))
        print(f"synth: {rate:.2f} fields/s (size {size}, in memory)")
    crop_seq = iter(range(10**6))
    rate = _rate(100, lambda: render_crop(crop_rng(0, "lab-a", "Seg", next(crop_seq)), lab, "Seg"))
    print(f"synth: {rate:.1f} crops/s (size 282, in memory)")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        manifest = generate_dataset(tmp, labs=2, specimens=2, fields=5, seed=0, size=704)
        n = len(manifest.fields())
        print(
            f"synth: {n / (time.perf_counter() - start):.2f} fields/s (size 704, written with masks)"
        )


if __name__ == "__main__":
    main()
