"""Training-set assembly: per-class cap, newest first, fixed validation split, no leaks."""

from __future__ import annotations

import numpy as np
import pytest

from bmcell.taxonomy import DEFAULT_TAXONOMY
from bmcell.trainset import (
    LabelledCell,
    assemble_training_set,
    check_no_leak,
    class_weights,
    trainable,
    validation_split,
)


def cell(
    cell_id: int,
    code: str = "MB",
    round_added: int = 0,
    source: str = "cst",
    specimen: int = 1,
    test_specimen: bool = False,
) -> LabelledCell:
    return LabelledCell(cell_id, code, round_added, source, specimen, test_specimen)


def test_per_class_cap_keeps_newest_round_first() -> None:
    labels = (
        [cell(i, "MB", 0, "initial") for i in range(0, 5)]
        + [cell(i, "MB", 1) for i in range(10, 15)]
        + [cell(i, "MB", 2, "al") for i in range(20, 23)]
        + [cell(i, "LY", 0, "initial") for i in range(30, 32)]
    )
    chosen = assemble_training_set(labels, per_class_cap=6)
    # Round 2's 3, then round 1's lowest 3 ids; round 0 dropped. LY under the cap.
    assert chosen == [10, 11, 12, 20, 21, 22, 30, 31]
    assert assemble_training_set(labels[::-1], per_class_cap=6) == chosen  # order-free
    assert len(assemble_training_set(labels, per_class_cap=None)) == len(labels)


def test_cap_holds_for_every_class() -> None:
    rng = np.random.default_rng(0)
    codes = DEFAULT_TAXONOMY.codes
    labels = [
        cell(i, codes[rng.integers(len(codes))], int(rng.integers(0, 25)), "cst")
        for i in range(5000)
    ]
    chosen = set(assemble_training_set(labels, per_class_cap=100))
    by_class: dict[str, int] = {}
    for c in labels:
        if c.cell_id in chosen:
            by_class[c.class_code] = by_class.get(c.class_code, 0) + 1
    assert max(by_class.values()) == 100
    # Newest first: every kept cell's round is >= every dropped cell's round, per class.
    for code in codes:
        kept = [c.round_added for c in labels if c.class_code == code and c.cell_id in chosen]
        dropped = [
            c.round_added for c in labels if c.class_code == code and c.cell_id not in chosen
        ]
        if dropped:
            assert min(kept) >= max(dropped)


def test_held_out_cells_never_train() -> None:
    labels = [
        cell(1, source="initial"),
        cell(2, source="validation"),
        cell(3, source="test", specimen=9),
        cell(4, source="cst", specimen=9),  # same specimen as a test cell
        cell(5, source="al", specimen=7, test_specimen=True),
        cell(6, source="st"),
        cell(7, source="al"),
    ]
    chosen = assemble_training_set(labels, exclude_ids={7})
    assert chosen == [1, 6]
    check_no_leak(chosen, [2, 3, 4, 5, 7])
    with pytest.raises(ValueError, match="held-out"):
        check_no_leak([1, 3], [3])


def test_duplicate_labels_and_bad_source_are_rejected() -> None:
    with pytest.raises(ValueError, match="more than one label"):
        trainable([cell(1), cell(1)])
    with pytest.raises(ValueError, match="source"):
        cell(1, source="guess")


def test_validation_split_is_fixed_per_class_and_stable() -> None:
    rng = np.random.default_rng(1)
    codes = DEFAULT_TAXONOMY.codes
    round1 = [
        cell(i, codes[i % len(codes)], 0, "initial", specimen=int(rng.integers(5)))
        for i in range(2000)
    ]
    round1.append(cell(99_999, "MB", 0, "initial", specimen=42, test_specimen=True))
    split = validation_split(round1, per_class=50, seed=3, eval_merge=DEFAULT_TAXONOMY.eval_merge)
    assert len(split) == 50 * len(DEFAULT_TAXONOMY.eval_codes)  # BN and ART share 50
    assert 99_999 not in split
    assert validation_split(round1[::-1], 50, 3, DEFAULT_TAXONOMY.eval_merge) == split

    # A later round adds cells. The stored split keeps excluding the same cells, and
    # a class that got no new candidates would draw the same cells anyway.
    round2 = round1 + [cell(10_000 + i, "LY", 1, "cst") for i in range(300)]
    train = assemble_training_set(round2, per_class_cap=1000, exclude_ids=split)
    check_no_leak(train, split)
    redrawn = validation_split(round2, 50, 3, DEFAULT_TAXONOMY.eval_merge)
    mb = {c.cell_id for c in round1 if c.class_code == "MB"}
    assert {i for i in redrawn if i in mb} == {i for i in split if i in mb}


def test_class_weights_inverse_frequency_normalised() -> None:
    counts = np.array([100, 50, 0, 850])
    w = class_weights(counts)
    assert w[2] == 0.0
    np.testing.assert_allclose(w[0] / w[1], 0.5)
    np.testing.assert_allclose((w * counts).sum() / counts.sum(), 1.0)
    with pytest.raises(ValueError, match="all zero"):
        class_weights([0, 0])


def test_validation_split_never_takes_a_rare_class_wholly() -> None:
    """A class with 30 labels and an initial quota of 25 gives 5 to validation, one
    with 20 gives none; a common class still gives its full 50; merged classes (BN and
    ART) each keep their own quota."""
    cells = [cell(i, "MB", 0, "initial") for i in range(30)]
    cells += [cell(100 + i, "PC", 0, "initial") for i in range(20)]
    cells += [cell(200 + i, "LY", 0, "initial") for i in range(300)]
    cells += [cell(600 + i, "BN", 0, "initial") for i in range(27)]
    cells += [cell(700 + i, "ART", 0, "initial") for i in range(40)]
    merge = DEFAULT_TAXONOMY.eval_merge
    assert merge.get("BN", "BN") == merge.get("ART", "ART")
    split = set(validation_split(cells, 50, 4, merge, keep_in_training=25))
    by_code: dict[str, int] = {}
    for c in cells:
        if c.cell_id in split:
            by_code[c.class_code] = by_code.get(c.class_code, 0) + 1
    assert by_code.get("MB") == 5 and "PC" not in by_code and by_code["LY"] == 50
    assert by_code["BN"] <= 2 and by_code["ART"] <= 15 and by_code["BN"] + by_code["ART"] == 17
    # Without the guard the same rare classes go wholly into validation.
    unguarded = set(validation_split(cells, 50, 4, merge))
    assert set(range(100, 120)) <= unguarded
    with pytest.raises(ValueError, match="keep_in_training"):
        validation_split(cells, 50, 4, merge, keep_in_training=-1)
