"""Training throughput: plain PyTorch in-process vs Ray Train with 1 and 2 workers.

Same model (``CellClassifier``), same crops, same augmentation, batch size and
input size; each worker and the plain loop get one intra-op thread (a Ray worker
reserves one CPU). Ray runs go through the trainer's own code path
(``services.trainer.runner.run``: Ray Train V2, DDP on gloo, a checkpoint to the
S3 server every epoch), on a private stack of just the S3 server and a Ray head
(port base 29400, ``--port-base``), which is stopped at the end. Samples/s is the median over the
epochs after the first (the first also fetches and decodes the crops).

Also measured, when ``--accuracy`` is given: round-1 training from 25 labels per
class (the study's initial set) at the trainer's default input size and epochs,
validation on 10 per class from the same labs.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
import uuid

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bmcell import trainset
from bmcell.network import CellClassifier
from bmcell.settings import TrainerSettings, load
from bmcell.stack import Stack, StackConfig
from bmcell.stack.config import REPO
from bmcell.storage import ObjectStore
from bmcell.synth import crop_rng, lab_style, render_crop
from bmcell.taxonomy import DEFAULT_TAXONOMY
from services.trainer import runner
from services.trainer.augment import augment, seeded_generator
from services.trainer.loop import CROP_BACKGROUND, CropCache
from services.trainer.plan import Plan

LABS = ["lab-a", "lab-b", "lab-c"]


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def upload_crops(
    store: ObjectStore, per_class: int, size: int, offset: int
) -> list[tuple[str, int, int]]:
    items = []
    for ci, code in enumerate(DEFAULT_TAXONOMY.codes):
        for i in range(per_class):
            lab = LABS[i % len(LABS)]
            image, _ = render_crop(
                crop_rng(5, lab, code, offset + i), lab_style(5, lab), code, size
            )
            key, _ = store.put_content_addressed("cells", png(image), suffix=".png")
            items.append((key, ci, len(items)))
    return items


def make_plan(settings, train, validation, epochs, workers, input_size, batch) -> Plan:
    counts = np.bincount([c for _, c, _ in train], minlength=DEFAULT_TAXONOMY.num_classes)
    return Plan(
        round_id=None,
        round_number=1,
        model_name="bench",
        taxonomy=DEFAULT_TAXONOMY.to_json(),
        input_size=input_size,
        epochs=epochs,
        num_workers=workers,
        cpus_per_worker=1.0,
        learning_rate=settings.learning_rate_first,
        momentum=settings.momentum,
        batch_size=batch,
        per_class_cap=settings.per_class_cap,
        max_accuracy_drop=settings.max_accuracy_drop,
        seed=1,
        init_version=None,
        init_state_key=None,
        class_weights=trainset.class_weights(counts).tolist(),
        train=train,
        validation=validation,
    )


def plain_torch(store, plan: Plan, threads: int) -> list[float]:
    """The worker loop's arithmetic without Ray: samples/s per epoch."""
    torch.set_num_threads(threads)
    cache = CropCache(store, plan.input_size)
    model = CellClassifier(DEFAULT_TAXONOMY.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=plan.learning_rate, momentum=plan.momentum)
    weights = torch.tensor(plan.class_weights, dtype=torch.float32)
    keys = [k for k, _, _ in plan.train]
    labels = torch.tensor([c for _, c, _ in plan.train])
    cache.batch(keys)  # fetched before timing, as the Ray figures skip epoch 1
    rates = []
    for epoch in range(1, plan.epochs + 1):
        started = time.perf_counter()
        order = torch.randperm(len(keys), generator=seeded_generator(epoch))
        gen = seeded_generator(1000 + epoch)
        model.train()
        for start in range(0, len(order), plan.batch_size):
            idx = order[start : start + plan.batch_size]
            x = augment(cache.batch([keys[i] for i in idx]), gen, fill=CROP_BACKGROUND)
            loss = F.cross_entropy(model(x), labels[idx], weight=weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
        rates.append(len(order) / (time.perf_counter() - started))
    return rates


def ray_train(settings, store, plan: Plan) -> tuple[list[dict], float]:
    job_id = f"bench-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    state = runner.run(job_id, plan, settings, store, lambda _progress: False)
    return state["history"], time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=8, help="training crops per class")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--crop", type=int, default=128, help="side of the rendered crops")
    ap.add_argument("--input-size", type=int, default=0, help="0: the trainer's default")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--accuracy", action="store_true", help="also train 25/class to the end")
    ap.add_argument("--port-base", type=int, default=29400, help="the private stack's ports")
    args, _ = ap.parse_known_args()

    cfg = StackConfig(run_dir=REPO / ".run" / "bench-trainer", port_base=args.port_base)
    stack = Stack(cfg)
    try:
        stack.up(only=["s3", "ray"])
        os.environ.update(stack.env())
        settings = load(
            TrainerSettings,
            database_url="unused-by-this-bench",
            classifier_addr="unused-by-this-bench",
            grpc_port=1,
            metrics_port=1,
        )
        store = ObjectStore(settings).ensure_buckets()
        size = args.input_size or settings.input_size
        train = upload_crops(store, args.per_class, args.crop, 0)
        val = upload_crops(store, 2, args.crop, 10_000)
        print(
            f"{len(train)} training crops ({args.crop} px) at {size}x{size}, "
            f"batch {args.batch}, {args.epochs} epochs",
            flush=True,
        )

        plain = plain_torch(
            store, make_plan(settings, train, val, args.epochs, 1, size, args.batch), 1
        )
        plain_rate = statistics.median(plain[1:] or plain)
        print(f"plain PyTorch, 1 thread:   {plain_rate:7.1f} samples/s", flush=True)
        results = {"plain": plain_rate}
        for workers in (1, 2):
            plan = make_plan(settings, train, val, args.epochs, workers, size, args.batch)
            history, wall = ray_train(settings, store, plan)
            rates = [h["samples_per_second"] for h in history[1:]] or [
                history[0]["samples_per_second"]
            ]
            results[workers] = statistics.median(rates)
            print(
                f"Ray Train, {workers} worker(s): {results[workers]:7.1f} samples/s "
                f"(x{results[workers] / plain_rate:.2f} of plain; {wall:.0f}s wall incl. start)",
                flush=True,
            )
        print(f"2 workers / 1 worker: x{results[2] / results[1]:.2f}")

        if args.accuracy:
            train25 = upload_crops(store, 25, 282, 20_000)
            val10 = upload_crops(store, 10, 282, 30_000)
            plan = make_plan(
                settings, train25, val10, settings.epochs, 2, size, settings.batch_size
            )
            history, wall = ray_train(settings, store, plan)
            best = max(h["validation_accuracy"] for h in history)
            print(
                f"round 1 from 25/class: {settings.epochs} epochs at {size}x{size}, 2 workers: "
                f"validation {history[-1]['validation_accuracy']:.3f} (best {best:.3f}), "
                f"{wall:.0f}s"
            )
    finally:
        stack.down()


if __name__ == "__main__":
    main()
