"""How hard is the synthetic task? Train the study's classifier on crops from some
labs, test on a lab it never saw, print accuracy and the confusion matrix.

The generator is tuned so the result lands well above chance and below perfect,
with most errors among MC/MMC/Band/Seg, as in the paper (its Fig. 3). Crops are
drawn in memory with the same per-crop seeds ``bmcell synth --crops-per-class``
writes. On 2 CPU cores the defaults take about 12 minutes; inputs are 64x64
(centre 192 px of the 282 crop) because 96x96 training is 4x slower on CPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from bmcell.network import CellClassifier
from bmcell.synth import crop_rng, lab_style, render_crop
from bmcell.taxonomy import DEFAULT_TAXONOMY

FOCUS = ("MC", "MMC", "Band", "Seg")


def crops(
    seed: int, labs: list[str], per_class: int, input_size: int, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops of every class, spread evenly over ``labs``, as (N, 3, S, S) floats in [0, 1]."""
    images, labels = [], []
    margin = (282 - window) // 2
    for ci, code in enumerate(DEFAULT_TAXONOMY.codes):
        for i in range(per_class):
            lab = labs[i % len(labs)]
            image, _ = render_crop(crop_rng(seed, lab, code, i), lab_style(seed, lab), code)
            window_img = image[margin : margin + window, margin : margin + window]
            small = Image.fromarray(window_img).resize((input_size, input_size), Image.BILINEAR)
            images.append(np.asarray(small))
            labels.append(ci)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return x, torch.tensor(labels)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flips and quarter turns (a cell has no up or left) and a per-image colour gain
    and gamma, so the model cannot lean on one lab's stain colour.
    """
    gain = 1.0 + 0.12 * (2 * torch.rand(len(x), 3, 1, 1, generator=gen) - 1)
    gamma = 1.0 + 0.2 * (2 * torch.rand(len(x), 1, 1, 1, generator=gen) - 1)
    x = (x.clamp_min(1e-4) ** gamma * gain).clamp(0.0, 1.0)
    if torch.rand(1, generator=gen).item() < 0.5:
        x = x.flip(3)
    k = int(torch.randint(0, 4, (1,), generator=gen).item())
    # Contiguous again: strided (rotated) inputs send convolutions down a slow path.
    return torch.rot90(x, k, dims=(2, 3)).contiguous()


def confusion(y: np.ndarray, p: np.ndarray, n: int) -> np.ndarray:
    m = np.zeros((n, n), dtype=int)
    np.add.at(m, (y, p), 1)
    return m


def format_matrix(m: np.ndarray, codes: list[str]) -> str:
    width = max(len(c) for c in codes) + 1
    head = " " * width + "".join(f"{c:>{width}}" for c in codes)
    rows = [
        f"{c:<{width}}" + "".join(f"{v:>{width}}" for v in row)
        for c, row in zip(codes, m, strict=True)
    ]
    return "\n".join([head, *rows])


def save_png(m: np.ndarray, codes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(codes)), codes, rotation=90)
    ax.set_yticks(range(len(codes)), codes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(codes)):
        for j in range(len(codes)):
            if m[i, j]:
                ax.text(
                    j,
                    i,
                    str(m[i, j]),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if m[i, j] > m.max() / 2 else "black",
                )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--train-labs", default="lab-a,lab-b,lab-c,lab-d")
    ap.add_argument("--test-lab", default="lab-e")
    ap.add_argument("--per-class", type=int, default=200, help="training crops per class")
    ap.add_argument("--test-per-class", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--input-size", type=int, default=64)
    ap.add_argument("--window", type=int, default=192, help="centre square of the 282 crop kept")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--png", type=Path, default=Path("docs/img/synth_confusion.png"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    codes = DEFAULT_TAXONOMY.codes
    train_labs = args.train_labs.split(",")

    t0 = time.perf_counter()
    x_tr, y_tr = crops(args.seed, train_labs, args.per_class, args.input_size, args.window)
    x_te, y_te = crops(
        args.seed + 1, [args.test_lab], args.test_per_class, args.input_size, args.window
    )
    print(
        f"crops: {len(y_tr)} train ({','.join(train_labs)}), {len(y_te)} test ({args.test_lab}) "
        f"in {time.perf_counter() - t0:.0f}s",
        flush=True,
    )

    model = CellClassifier(len(codes))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=2e-3, total_steps=args.epochs * ((len(y_tr) + 63) // 64)
    )
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(y_tr), generator=gen)
        total = 0.0
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            loss = loss_fn(model(augment(x_tr[idx], gen)), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(
            f"epoch {epoch + 1}/{args.epochs}: loss {total / len(y_tr):.3f} "
            f"({time.perf_counter() - t0:.0f}s)",
            flush=True,
        )

    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x_te[i : i + 128]).argmax(1) for i in range(0, len(y_te), 128)])
    y, p = y_te.numpy(), pred.numpy()
    m = confusion(y, p, len(codes))
    acc = float((y == p).mean())
    focus = [codes.index(c) for c in FOCUS]
    errors = m.sum() - np.trace(m)
    in_focus = m[np.ix_(focus, focus)].sum() - np.trace(m[np.ix_(focus, focus)])
    print(f"\naccuracy on unseen {args.test_lab}: {acc:.3f} (chance {1 / len(codes):.3f})")
    print(
        f"errors: {errors}, of which among {'/'.join(FOCUS)}: {in_focus} "
        f"({in_focus / max(errors, 1):.0%})"
    )
    print(format_matrix(m, codes))
    save_png(m, codes, args.png, f"unseen {args.test_lab}: accuracy {acc:.3f}")
    print(f"confusion matrix: {args.png}  total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
