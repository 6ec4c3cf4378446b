"""What one training job does, decided once and stored with the job.

The plan is written to ``training_jobs.config`` when the job is created, so a job
resumed by another trainer process trains on exactly the same cells with the same
settings, whatever labels arrived in between. Its rules are the study's:

- training set: ``trainset.assemble_training_set`` (<= ``per_class_cap`` per class,
  the newest round's additions first) over the labels added up to the round;
- validation: the labels whose source is ``validation`` (a fixed set, never drawn
  again), never in training;
- test: the labels whose source is ``test`` (cells of test specimens), never in
  training; ``trainset.check_no_leak`` asserts both;
- transfer: from the active version's plain ``state_dict`` when one is stored, with
  lr ``learning_rate_later``; otherwise from scratch with ``learning_rate_first``;
- loss weights: ``trainset.class_weights`` of the training set's class counts;
- gate: a bootstrap round's version must reach the round's ``params.gate`` (default
  0.80) in validation accuracy to be served (``publish`` applies it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bmcell import log, trainset
from bmcell.db import Database
from bmcell.errors import FailedPrecondition, InvalidArgument
from bmcell.modelstore import state_dict_key
from bmcell.settings import TrainerSettings
from bmcell.storage import ObjectStore
from bmcell.taxonomy import DEFAULT_TAXONOMY, Taxonomy
from services.trainer import jobs

_LOG = log.get(__name__)
#: The study's gate before rounds start: the initial model's validation accuracy.
BOOTSTRAP_GATE = 0.80


@dataclass
class Overrides:
    """A StartTraining request's explicit settings; 0 means "the settings' default"."""

    epochs: int = 0
    num_workers: int = 0
    cpus_per_worker: float = 0.0
    learning_rate: float = 0.0
    batch_size: int = 0
    per_class_cap: int = 0
    max_accuracy_drop: float = 0.0
    input_size: int = 0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < 0:
                raise InvalidArgument(f"must be >= 0 (0: default), got {value}", field=name)
        if self.input_size % 16:
            raise InvalidArgument(
                f"must be a multiple of 16, got {self.input_size}", field="input_size"
            )


@dataclass
class Plan:
    round_id: int | None
    round_number: int | None
    model_name: str
    taxonomy: dict[str, Any]
    input_size: int
    epochs: int
    num_workers: int
    cpus_per_worker: float
    learning_rate: float
    momentum: float
    batch_size: int
    per_class_cap: int
    max_accuracy_drop: float
    seed: int
    init_version: int | None
    init_state_key: str | None
    class_weights: list[float]
    # Validation accuracy a version must reach to be served (bootstrap rounds only).
    gate: float | None = None
    # What the test split is, in words, for the model report.
    test_set: str = ""
    # (crop_key, training-class index, cell id)
    train: list[tuple[str, int, int]] = field(default_factory=list)
    validation: list[tuple[str, int, int]] = field(default_factory=list)
    test: list[tuple[str, int, int]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        plan = cls(**data)
        for name in ("train", "validation", "test"):
            setattr(plan, name, [tuple(x) for x in getattr(plan, name)])
        return plan

    @property
    def tax(self) -> Taxonomy:
        return Taxonomy.from_json(self.taxonomy)


def make_plan(
    db: Database,
    store: ObjectStore,
    settings: TrainerSettings,
    round_id: int | None,
    overrides: Overrides,
) -> Plan:
    round_row = jobs.round_row(db, round_id) if round_id is not None else None
    round_number = round_row["number"] if round_row else None
    active = jobs.active_version(db, settings.model_name)
    taxonomy = Taxonomy.from_json(active["taxonomy"]) if active else DEFAULT_TAXONOMY
    init_key = state_dict_key(settings.model_name, active["version"]) if active else None
    if init_key is not None and not store.exists(init_key):
        # A version registered outside the trainer has no plain weights to start from.
        _LOG.warning(
            "no weights to transfer from: training from scratch",
            model=settings.model_name,
            active_version=active["version"],
            missing=init_key,
        )
        init_key = None
    cap = overrides.per_class_cap or settings.per_class_cap

    # Labels count only within their round's experiment.
    cells, crop_keys = jobs.labelled_cells(
        db, round_number, round_row["experiment"] if round_row else None
    )
    known = {c.cell_id: c for c in cells if c.class_code in taxonomy.codes}
    validation = sorted(c.cell_id for c in known.values() if c.source == "validation")
    test = sorted(c.cell_id for c in known.values() if c.source == "test")
    train = trainset.assemble_training_set(known.values(), cap, exclude_ids=validation)
    trainset.check_no_leak(train, [*test, *validation])
    if not train:
        raise FailedPrecondition(
            f"round {round_number}: no trainable labels (sources {sorted(trainset.TRAINABLE_SOURCES)})"
        )

    def items(ids: list) -> list[tuple[str, int, int]]:
        return [(crop_keys[i], taxonomy.index(known[i].class_code), int(i)) for i in ids]

    train_items = items(train)
    counts = np.bincount([c for _, c, _ in train_items], minlength=taxonomy.num_classes)
    return Plan(
        round_id=round_id,
        round_number=round_number,
        model_name=settings.model_name,
        taxonomy=taxonomy.to_json(),
        input_size=overrides.input_size or settings.input_size,
        epochs=overrides.epochs or settings.epochs,
        num_workers=overrides.num_workers or settings.num_workers,
        cpus_per_worker=overrides.cpus_per_worker or settings.cpus_per_worker,
        learning_rate=overrides.learning_rate
        or (settings.learning_rate_later if init_key else settings.learning_rate_first),
        momentum=settings.momentum,
        batch_size=overrides.batch_size or settings.batch_size,
        per_class_cap=cap,
        max_accuracy_drop=overrides.max_accuracy_drop or settings.max_accuracy_drop,
        seed=round_number or 0,
        init_version=active["version"] if init_key else None,
        init_state_key=init_key,
        class_weights=trainset.class_weights(counts).tolist(),
        gate=bootstrap_gate(round_row),
        test_set=describe_test_set([known[i] for i in test], taxonomy),
        train=train_items,
        validation=items(validation),
        test=items(test),
    )


def bootstrap_gate(round_: dict | None) -> float | None:
    """The gate of a bootstrap round (``params.gate``, 0 or absent: the default, as the
    rounds driver reads it); None for other rounds, which only the drop gate checks."""
    if round_ is None or round_["strategy"] != "bootstrap":
        return None
    return float((round_["params"] or {}).get("gate") or BOOTSTRAP_GATE)


def describe_test_set(cells: list, taxonomy: Taxonomy) -> str:
    """E.g. "test specimens: 800 cells from 2 specimens, 50 per evaluation class, 16
    classes" (or "... 12-50 per evaluation class ..." when unbalanced)."""
    if not cells:
        return "no test set: no labels of test specimens"
    merge = taxonomy.eval_merge
    per_class: dict[str, int] = {}
    for c in cells:
        code = merge.get(c.class_code, c.class_code)
        per_class[code] = per_class.get(code, 0) + 1
    low, high = min(per_class.values()), max(per_class.values())
    spread = f"{low}" if low == high else f"{low}-{high}"
    specimens = len({c.specimen_id for c in cells})
    return (
        f"test specimens: {len(cells)} cells from {specimens} "
        f"specimen{'s' if specimens != 1 else ''}, {spread} per evaluation class, "
        f"{len(per_class)} of {len(taxonomy.eval_codes)} classes"
    )
