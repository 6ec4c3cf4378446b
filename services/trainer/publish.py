"""After training: evaluate, register, and promote or reject the new version.

Evaluation runs in the trainer process with plain PyTorch on the cells' thumbs
(``bmcell.thumbs``: the classifier's own preprocessing, stored per cell, read in one
query), over the validation and test splits, scored by ``bmcell.evaluation.evaluate`` (BN and ART
merged). The version is registered with ``bmcell.modelstore.register_version``
(TorchScript into the Triton repository) and its plain ``state_dict`` is stored
beside it for the next round's transfer.

Promotion gates, both on the merged (16-class) validation accuracy, the number the
training loop chose its best epoch by:

- a version trained in a bootstrap round must reach the round's gate (``Plan.gate``,
  0.80 by default). One that misses it is ``rejected`` and never served, even when no
  version is active: the classifier then keeps its previous active version, or, with
  none, refuses to classify ("no model passed the gate yet");
- every version must be at most ``max_accuracy_drop`` below the active version's
  (with none active, only the bootstrap gate applies).

Passing calls ``activate`` (the classifier's ActivateModel, injected by the server so
that this module has no transport code); failing marks the version ``rejected`` with
the reason. Calibration: a temperature fitted on the validation logits
(``bmcell.calibration``, Guo et al. 2017) is stored under ``metrics["calibration"]``
with the 15-bin ECE before and after; the classifier applies it. Every step is idempotent: a job resumed after a crash
here finds the version it already registered (``metrics.job_id``) and carries on.
"""

from __future__ import annotations

import io
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bmcell import calibration, evaluation, modelstore, thumbs
from bmcell.db import Database
from bmcell.errors import BmcellError
from bmcell.metrics import MODEL_ECE, MODEL_TEMPERATURE
from bmcell.modelstore import state_dict_key
from bmcell.network import CellClassifier
from bmcell.storage import ObjectStore
from bmcell.taxonomy import Taxonomy
from services.trainer import jobs
from services.trainer.plan import Plan


@dataclass
class Outcome:
    version: int
    validation_accuracy: float
    test_accuracy: float | None
    published: bool
    message: str


def logits(
    model: torch.nn.Module, db: Database, store: ObjectStore, items: list, input_size: int
) -> np.ndarray:
    """The model's logits ``(n, C)`` for each ``(crop_key, class, cell_id)`` item."""
    pixels = thumbs.fetch(db, store, [cell for _, _, cell in items], input_size)
    out = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(pixels), 64):
            x = torch.from_numpy(thumbs.to_batch(pixels[start : start + 64]))
            out.append(model(x).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float64)


def predict(
    model: torch.nn.Module, db: Database, store: ObjectStore, items: list, input_size: int
) -> np.ndarray:
    """The model's class index for each ``(crop_key, class, cell_id)`` item."""
    z = logits(model, db, store, items, input_size)
    return z.argmax(1) if len(z) else np.zeros(0, dtype=np.int64)


def score(
    model: torch.nn.Module,
    db: Database,
    store: ObjectStore,
    items: list,
    plan: Plan,
    tax: Taxonomy,
) -> evaluation.Evaluation | None:
    return score_logits(
        logits(model, db, store, items, plan.input_size) if items else None, items, tax
    )


def score_logits(z: np.ndarray | None, items: list, tax: Taxonomy) -> evaluation.Evaluation | None:
    if not items or z is None:
        return None
    truth = np.asarray([c for _, c, _ in items])
    return evaluation.evaluate(truth, z.argmax(1), tax)


def fit_calibration(z: np.ndarray | None, items: list) -> calibration.Calibration | None:
    """Temperature scaling on the validation split's logits (None without one)."""
    if z is None or not items:
        return None
    return calibration.calibrate(z, np.asarray([c for _, c, _ in items], dtype=np.int64))


def upload_confusion(
    store: ObjectStore, ev: evaluation.Evaluation, model_name: str, version: int, split: str
) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = evaluation.plot_confusion(
            ev, Path(d) / "confusion.png", f"{model_name} v{version}, {split} split"
        )
        key = f"reports/confusion/{model_name}/v{version}-{split}.png"
        store.put(key, path.read_bytes(), "image/png")
    return key


def _number(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def publish(
    db: Database,
    store: ObjectStore,
    job_id: str,
    plan: Plan,
    model_state: dict,
    history: list[dict],
    activate: Callable[[int], None],
) -> Outcome:
    tax = plan.tax
    model = CellClassifier(tax.num_classes)
    model.load_state_dict(model_state)
    model.eval()
    val_z = logits(model, db, store, plan.validation, plan.input_size) if plan.validation else None
    val = score_logits(val_z, plan.validation, tax)
    cal = fit_calibration(val_z, plan.validation)
    test = score(model, db, store, plan.test, plan, tax)
    val_acc = val.accuracy if val is not None else history[-1]["validation_accuracy"]
    test_acc = test.accuracy if test is not None else None

    existing = jobs.version_of_job(db, plan.model_name, job_id)
    if existing is not None:
        version = existing["version"]
    else:
        metrics = {
            "job_id": job_id,
            "validation": val.to_json() if val else None,
            "test": test.to_json() if test else None,
            # The headline figures beside accuracy (read by the rounds' report), and
            # which cells the test figures come from.
            "validation_balanced_accuracy": _number(val.balanced_accuracy) if val else None,
            "validation_macro_f1": _number(val.macro_f1) if val else None,
            "test_balanced_accuracy": _number(test.balanced_accuracy) if test else None,
            "test_macro_f1": _number(test.macro_f1) if test else None,
            "test_set": plan.test_set,
            "gate": plan.gate,
            "train_size": len(plan.train),
            "epochs": plan.epochs,
            "learning_rate": plan.learning_rate,
            "transferred_from": plan.init_version,
            "history": history,
            # Temperature scaling fitted on the validation split (bmcell.calibration);
            # the classifier applies metrics.calibration.temperature when present.
            "calibration": cal.to_json() if cal else None,
        }
        version = modelstore.register_version(
            db,
            store,
            model,
            tax,
            plan.input_size,
            model_name=plan.model_name,
            round_id=plan.round_id,
            metrics=metrics,
            validation_accuracy=val_acc,
            test_accuracy=test_acc,
            note=f"training job {job_id}",
        )
    if cal is not None:
        MODEL_ECE.labels(plan.model_name, "uncalibrated").set(cal.ece_before)
        MODEL_ECE.labels(plan.model_name, "calibrated").set(cal.ece_after)
        MODEL_TEMPERATURE.labels(plan.model_name).set(cal.temperature)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    store.put(state_dict_key(plan.model_name, version), buf.getvalue())
    if test is not None or val is not None:
        split, ev = ("test", test) if test is not None else ("validation", val)
        key = upload_confusion(store, ev, plan.model_name, version, split)
        jobs.set_confusion_key(db, plan.model_name, version, key)

    row = jobs.model_version(db, plan.model_name, version)
    if row["state"] in ("active", "retired"):
        return Outcome(version, val_acc, test_acc, True, f"v{version} published")
    if row["state"] == "rejected":
        return Outcome(version, val_acc, test_acc, False, row["note"])
    if plan.gate is not None and val_acc < plan.gate:
        note = (
            f"rejected: validation accuracy {val_acc:.4f} is below the bootstrap gate "
            f"{plan.gate:.2f}; not served"
        )
        jobs.reject(db, plan.model_name, version, note)
        return Outcome(version, val_acc, test_acc, False, f"v{version} {note}")
    active = jobs.active_version(db, plan.model_name)
    floor = None
    if active is not None and active["validation_accuracy"] is not None:
        floor = active["validation_accuracy"] - plan.max_accuracy_drop
    if floor is not None and val_acc < floor:
        note = (
            f"rejected: validation accuracy {val_acc:.4f} is more than "
            f"{plan.max_accuracy_drop:.4f} below active v{active['version']}'s "
            f"{active['validation_accuracy']:.4f}"
        )
        jobs.reject(db, plan.model_name, version, note)
        return Outcome(version, val_acc, test_acc, False, f"v{version} {note}")
    try:
        activate(version)
    except BmcellError as exc:
        return Outcome(
            version, val_acc, test_acc, False, f"v{version} registered but not activated: {exc}"
        )
    return Outcome(
        version, val_acc, test_acc, True, f"v{version} published (validation {val_acc:.4f})"
    )
