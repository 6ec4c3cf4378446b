"""Ray Train throughput before and after the trainer's input path changed, alternated.

Arm "before": the trainer loop of a git revision (``--before``, default the merge base
with main), where every worker fetches each PNG crop from the S3 server and decodes
it (then keeps it) and trains in NCHW. Arm "after": this tree's ``runner.run``,
where the driver stages the cells' uint8 inputs once and workers train from memory
in ``channels_last``. Same crops (282 px, as the segmenter stores them), same plan
(input size, batch, epochs, seeds), 2 Ray workers of one CPU each, on a private
stack of the S3 server and a Ray head (``--port-base``). Arms run A B A B.

Reported per arm: median samples/s over the epochs after the first, median epoch
seconds (the "after" arm's include validation and checkpoint; the "before" arm's
exclude its checkpoint), the run's wall time, and the load average around it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
import uuid

import numpy as np
from PIL import Image

from bmcell import preprocess, trainset
from bmcell.settings import TrainerSettings, load
from bmcell.stack import Stack, StackConfig
from bmcell.stack.config import REPO
from bmcell.storage import ObjectStore
from bmcell.synth import crop_rng, lab_style, render_crop
from bmcell.taxonomy import DEFAULT_TAXONOMY
from services.trainer import runner
from services.trainer.loop import load_checkpoint_state
from services.trainer.plan import Plan

LABS = ["lab-a", "lab-b", "lab-c"]


def loadavg() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def crops(store: ObjectStore, per_class: int, offset: int) -> tuple[list, list]:
    items, images = [], []
    for ci, code in enumerate(DEFAULT_TAXONOMY.codes):
        for i in range(per_class):
            lab = LABS[i % len(LABS)]
            image, _ = render_crop(crop_rng(5, lab, code, offset + i), lab_style(5, lab), code, 282)
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            key, _ = store.put_content_addressed("cells", buf.getvalue(), suffix=".png")
            items.append((key, ci, offset + len(items)))
            images.append(image)
    return items, images


def before_loop(rev: str):
    """The revision's ``services/trainer/loop.py`` as a module Ray ships by value."""
    import ray.cloudpickle

    src = subprocess.check_output(["git", "show", f"{rev}:services/trainer/loop.py"], cwd=REPO)
    mod = types.ModuleType("bmcell_trainer_loop_before")
    sys.modules[mod.__name__] = mod
    exec(compile(src, f"{rev}:services/trainer/loop.py", "exec"), mod.__dict__)
    ray.cloudpickle.register_pickle_by_value(mod)
    return mod


def fit_before(mod, settings, plan: Plan, job_id: str) -> list[dict]:
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = {
        "job_id": job_id,
        "prefix": runner.control_prefix(job_id),
        "s3": runner.s3_options(settings),
        "train": [(k, c) for k, c, _ in plan.train],
        "validation": [(k, c) for k, c, _ in plan.validation],
        "num_classes": DEFAULT_TAXONOMY.num_classes,
        "input_size": plan.input_size,
        "epochs": plan.epochs,
        "batch_size": plan.batch_size,
        "learning_rate": plan.learning_rate,
        "momentum": plan.momentum,
        "class_weights": plan.class_weights,
        "seed": plan.seed,
        "threads": 1,
        "eval_index_map": plan.tax.eval_index_map(),
    }
    runner.ensure_ray(settings.ray_address)
    result = TorchTrainer(
        mod.train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=plan.num_workers, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            name=job_id,
            storage_path=f"{settings.data_bucket}/checkpoints",
            storage_filesystem=runner.storage_filesystem(settings),
            checkpoint_config=CheckpointConfig(num_to_keep=settings.checkpoints_to_keep),
        ),
    ).fit()
    with tempfile.TemporaryDirectory() as d:
        return load_checkpoint_state(result.checkpoint.to_directory(d))["history"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=40, help="training crops per class")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16, help="per worker (the trainer's default)")
    ap.add_argument("--input-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="A B pairs")
    ap.add_argument("--before", default="", help="git revision of the old loop (merge base)")
    ap.add_argument("--port-base", type=int, default=29350)
    ap.add_argument("--json", default="", help="also write the figures here")
    args = ap.parse_args()
    rev = (
        args.before
        or subprocess.check_output(
            ["git", "merge-base", "HEAD", "main"], cwd=REPO, text=True
        ).strip()
    )

    stack = Stack(StackConfig(run_dir=REPO / ".run" / "measure-trainer", port_base=args.port_base))
    try:
        stack.up(only=["s3", "ray"])
        os.environ.update(stack.env())
        settings = load(
            TrainerSettings,
            database_url="unused-by-this-measurement",
            classifier_addr="unused-by-this-measurement",
            grpc_port=1,
            metrics_port=1,
        )
        store = ObjectStore(settings).ensure_buckets()
        train, train_images = crops(store, args.per_class, 0)
        val, val_images = crops(store, 5, 100_000)
        pixels = np.stack(
            [preprocess.crop_to_uint8(c, args.input_size) for c in train_images + val_images]
        )
        counts = np.bincount([c for _, c, _ in train], minlength=DEFAULT_TAXONOMY.num_classes)
        plan = Plan(
            round_id=None,
            round_number=1,
            model_name="measure",
            taxonomy=DEFAULT_TAXONOMY.to_json(),
            input_size=args.input_size,
            epochs=args.epochs,
            num_workers=args.workers,
            cpus_per_worker=1.0,
            learning_rate=settings.learning_rate_first,
            momentum=settings.momentum,
            batch_size=args.batch,
            per_class_cap=settings.per_class_cap,
            max_accuracy_drop=settings.max_accuracy_drop,
            seed=1,
            init_version=None,
            init_state_key=None,
            class_weights=trainset.class_weights(counts).tolist(),
            train=train,
            validation=val,
        )
        old = before_loop(rev)
        print(
            f"{len(train)} training + {len(val)} validation cells, {args.input_size} px, "
            f"batch {args.batch}/worker, {args.epochs} epochs, {args.workers} workers; "
            f"before = {rev[:10]}",
            flush=True,
        )
        rows = []
        for rep in range(args.repeats):
            for arm in ("before", "after"):
                job_id = f"measure-{arm}-{uuid.uuid4().hex[:6]}"
                load_before, started = loadavg(), time.perf_counter()
                if arm == "before":
                    history = fit_before(old, settings, plan, job_id)
                else:
                    state = runner.run(job_id, plan, settings, store, lambda _p: False, pixels)
                    history = state["history"]
                wall = time.perf_counter() - started
                later = history[1:] or history
                row = {
                    "arm": arm,
                    "repeat": rep,
                    "samples_per_second": statistics.median(h["samples_per_second"] for h in later),
                    "epoch_seconds": statistics.median(h["seconds"] for h in later),
                    "first_epoch_seconds": history[0]["seconds"],
                    "checkpoint_seconds": statistics.median(
                        h.get("checkpoint_seconds", float("nan")) for h in later
                    ),
                    "wall_seconds": wall,
                    "loadavg_before": load_before,
                    "loadavg_after": loadavg(),
                    "final_loss": history[-1]["loss"],
                }
                rows.append(row)
                print(
                    f"{arm:6s} #{rep}: {row['samples_per_second']:6.1f} samples/s, "
                    f"epoch {row['epoch_seconds']:5.2f} s (first {row['first_epoch_seconds']:.2f} s, "
                    f"checkpoint {row['checkpoint_seconds']:.2f} s), run {wall:5.1f} s, "
                    f"load {load_before} -> {row['loadavg_after']}",
                    flush=True,
                )
        for arm in ("before", "after"):
            rates = [r["samples_per_second"] for r in rows if r["arm"] == arm]
            print(f"{arm}: median {statistics.median(rates):.1f} samples/s over {len(rates)} runs")
        ratio = statistics.median(
            r["samples_per_second"] for r in rows if r["arm"] == "after"
        ) / statistics.median(r["samples_per_second"] for r in rows if r["arm"] == "before")
        print(f"after / before: x{ratio:.2f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rows": rows, "before": rev, "args": vars(args)}, f, indent=2)
    finally:
        stack.down()


if __name__ == "__main__":
    main()
