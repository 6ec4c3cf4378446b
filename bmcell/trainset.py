"""Which labelled cells a round trains on (issue 8).

Nakamura et al. (Sci Rep 12:16736, 2022), Methods: "the data added in the (n-1)-th
semi-supervised learning were preferentially preserved in the nth training data,
and the data added before the (n-1)-th time in the labeled data pool were deleted
from the nth training data to avoid exceeding 1000 images per class". New labels
are thus trained on at least once, and classes stay within one cap of each other.

The validation set (50 per evaluation class) comes from training specimens; the
test set (50 per evaluation class) from specimens never used for training. Neither
ever enters a training set, and no cell of a test specimen does, whatever its
label's source: cells of one specimen share stain, smear and patient, so a test
specimen's cells in training would flatter the test accuracy.

Everything here is pure: label records in, cell ids out. The trainer reads the
records from Postgres and stores what these functions decide.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

import numpy as np

SOURCES: tuple[str, ...] = (
    "initial",
    "cst",
    "al",
    "st",
    "random",
    "import",
    "test",
    "validation",
)
# ``import``: labelled crops brought in from outside (`bmcell import`), trained on like
# the initial set.
TRAINABLE_SOURCES: frozenset[str] = frozenset({"initial", "cst", "al", "st", "random", "import"})


@dataclass(frozen=True)
class LabelledCell:
    """One cell's current label, as the trainer reads it.

    ``round_added`` is the round whose review added the label (0 for the initial
    set); ``source`` says how: ``initial``, ``cst``, ``al``, ``st``, ``random`` (the
    random-sampling baseline), ``import`` (crops brought in labelled), or ``test`` /
    ``validation`` for cells held out for evaluation.
    """

    cell_id: Hashable
    class_code: str
    round_added: int
    source: str
    specimen_id: Hashable
    is_test_specimen: bool
    labelled_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source {self.source!r} is not one of {list(SOURCES)}")
        if self.round_added < 0:
            raise ValueError(f"round_added must be >= 0, got {self.round_added}")


def _unique(cells: list[LabelledCell]) -> list[LabelledCell]:
    seen: set[Hashable] = set()
    for c in cells:
        if c.cell_id in seen:
            raise ValueError(
                f"cell {c.cell_id!r} has more than one label; pass each cell's current label"
            )
        seen.add(c.cell_id)
    return cells


def trainable(
    labels: Iterable[LabelledCell], exclude_ids: Collection[Hashable] = ()
) -> list[LabelledCell]:
    """Labels that may enter a training set.

    Drops validation and test labels, ``exclude_ids`` (the stored validation split),
    and every cell of a test specimen, where a specimen counts as a test specimen if
    any of its cells is flagged so or carries a test label.
    """
    cells = _unique(list(labels))
    excluded = set(exclude_ids)
    test_specimens = {c.specimen_id for c in cells if c.is_test_specimen or c.source == "test"}
    return [
        c
        for c in cells
        if c.source in TRAINABLE_SOURCES
        and c.specimen_id not in test_specimens
        and c.cell_id not in excluded
    ]


def assemble_training_set(
    labels: Iterable[LabelledCell],
    per_class_cap: int | None = 1000,
    exclude_ids: Collection[Hashable] = (),
) -> list[Hashable]:
    """The round's training cell ids: at most ``per_class_cap`` per class, newest first.

    Within each class the cells are ranked by ``round_added`` descending, then by
    cell id ascending (a deterministic tie-break inside a round); the first
    ``per_class_cap`` are kept. ``per_class_cap=None`` keeps all. Cells that
    :func:`trainable` rejects are silently left out: excluding them is this
    function's job; :func:`check_no_leak` is the assertion for callers. Returns ids
    sorted ascending.
    """
    if per_class_cap is not None and per_class_cap < 1:
        raise ValueError(f"per_class_cap must be None or >= 1, got {per_class_cap}")
    cells = trainable(labels, exclude_ids)
    if not cells:
        return []
    ids = np.asarray([c.cell_id for c in cells])
    if per_class_cap is None:
        return np.sort(ids).tolist()
    classes = np.asarray([c.class_code for c in cells])
    rounds = np.asarray([c.round_added for c in cells])
    order = np.lexsort((ids, -rounds, classes))
    cls_sorted = classes[order]
    starts = np.r_[0, np.flatnonzero(cls_sorted[1:] != cls_sorted[:-1]) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, cls_sorted.size]))
    rank_in_class = np.arange(cls_sorted.size) - group_start
    return np.sort(ids[order][rank_in_class < per_class_cap]).tolist()


def check_no_leak(train_ids: Iterable[Hashable], test_ids: Iterable[Hashable]) -> None:
    """Raise ``ValueError`` naming the first few ids that sit in both sets."""
    leaked = sorted(set(train_ids) & set(test_ids), key=repr)
    if leaked:
        raise ValueError(f"{len(leaked)} held-out cells are in the training set: {leaked[:10]}")


def validation_split(
    candidate_cells: Iterable[LabelledCell],
    per_class: int = 50,
    seed: int = 0,
    eval_merge: Mapping[str, str] | None = None,
    keep_in_training: int = 0,
) -> list[Hashable]:
    """Choose the validation set once: ``per_class`` cells per evaluation class.

    Candidates from test specimens are never chosen. Classes are grouped by
    ``eval_merge`` (``Taxonomy.eval_merge``; codes absent from it stand for
    themselves), so the study's 50 per evaluation class puts BN and ART together.
    Each evaluation class walks its candidates, sorted by cell id, in an order drawn
    by a generator seeded with ``(seed, crc32(class))``: the same candidates and seed
    give the same split, and one class's new candidates do not move another class's
    choice.

    ``keep_in_training`` cells of every (training) class stay out of the split, so a
    rare class is never moved wholly into validation: the bootstrap passes its
    initial quota. A class with fewer spare candidates gives what it can spare.

    The trainer stores the split with the run and passes it to
    :func:`assemble_training_set` as ``exclude_ids`` every round; it never calls
    this again for the run, because new labels would reshuffle the draw and leak
    earlier validation cells into training.
    """
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    if keep_in_training < 0:
        raise ValueError(f"keep_in_training must be >= 0, got {keep_in_training}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    merge = eval_merge or {}
    cells = [
        c for c in _unique(list(candidate_cells)) if not c.is_test_specimen and c.source != "test"
    ]
    spare: dict[str, int] = {}
    by_class: dict[str, list[tuple[Hashable, str]]] = {}
    for c in cells:
        spare[c.class_code] = spare.get(c.class_code, 0) + 1
        by_class.setdefault(merge.get(c.class_code, c.class_code), []).append(
            (c.cell_id, c.class_code)
        )
    spare = {code: max(0, n - keep_in_training) for code, n in spare.items()}
    chosen: list[Hashable] = []
    for code, members in by_class.items():
        members.sort(key=lambda m: m[0])
        rng = np.random.Generator(np.random.PCG64([seed, zlib.crc32(code.encode())]))
        taken = 0
        for i in rng.permutation(len(members)):
            if taken == per_class:
                break
            cell_id, cls = members[int(i)]
            if spare[cls]:
                spare[cls] -= 1
                chosen.append(cell_id)
                taken += 1
    return sorted(chosen)


def class_weights(counts: np.ndarray | list[int]) -> np.ndarray:
    """Inverse-frequency loss weights, ``N / (K * n_c)`` for the ``K`` present classes.

    Normalised so the mean weight over training samples is 1, which keeps the loss
    on the scale of the unweighted one (the learning rate need not change as rounds
    unbalance the classes). Absent classes get weight 0: no sample carries them.
    """
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or np.any(n < 0):
        raise ValueError(f"counts must be a 1-d array of non-negative counts, got {counts!r}")
    present = n > 0
    if not present.any():
        raise ValueError("counts are all zero; there is nothing to weight")
    weights = np.zeros_like(n)
    weights[present] = n.sum() / (present.sum() * n[present])
    return weights
