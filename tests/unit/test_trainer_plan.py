"""The trainer's pure pieces: request overrides, the stored plan, the worker config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bmcell.errors import InvalidArgument
from bmcell.modelstore import state_dict_key
from bmcell.settings import TrainerSettings, load
from bmcell.synth.field import CROP_FILL
from bmcell.taxonomy import DEFAULT_TAXONOMY
from services.trainer import runner
from services.trainer.augment import AugmentParams, augment, seeded_generator
from services.trainer.loop import CROP_BACKGROUND, LoopConfig
from services.trainer.plan import Overrides, Plan


def settings() -> TrainerSettings:
    return load(
        TrainerSettings,
        database_url="postgresql://x@127.0.0.1:1/x",
        s3_endpoint="127.0.0.1:9",
        ray_address="127.0.0.1:6379",
        classifier_addr="127.0.0.1:50052",
    )


def plan() -> Plan:
    return Plan(
        round_id=4,
        round_number=2,
        model_name="bmcell-cell",
        taxonomy=DEFAULT_TAXONOMY.to_json(),
        input_size=64,
        epochs=3,
        num_workers=2,
        cpus_per_worker=1.0,
        learning_rate=0.005,
        momentum=0.9,
        batch_size=16,
        per_class_cap=1000,
        max_accuracy_drop=0.01,
        seed=2,
        init_version=1,
        init_state_key=state_dict_key("bmcell-cell", 1),
        class_weights=[1.0] * 17,
        train=[("cells/a.png", 0, 10), ("cells/b.png", 3, 11)],
        validation=[("cells/c.png", 1, 12)],
        test=[("cells/d.png", 2, 13)],
    )


def test_overrides_refuse_negative_values_naming_the_field() -> None:
    with pytest.raises(InvalidArgument) as err:
        Overrides(epochs=-1)
    assert err.value.field == "epochs"
    with pytest.raises(InvalidArgument) as err:
        Overrides(input_size=40)
    assert err.value.field == "input_size"
    assert Overrides().epochs == 0  # 0: the settings' default


def test_plan_survives_its_json_round_trip() -> None:
    p = plan()
    again = Plan.from_json(p.to_json())
    assert again == p
    assert again.tax.codes == DEFAULT_TAXONOMY.codes


def test_loop_config_carries_what_workers_need_and_nothing_of_the_test_split() -> None:
    cfg = runner.loop_config("train-x", plan(), settings())
    assert isinstance(cfg, LoopConfig)
    # Class indices in plan order; the pixels travel as one object, no crop key at all.
    assert cfg.train_labels == [0, 3] and cfg.validation_labels == [1]
    assert cfg.inputs_key == runner.inputs_key("train-x")
    assert "cells/" not in repr(cfg.to_dict())  # no crop is read, and no test cell known
    assert cfg.num_classes == 17 and cfg.threads == 1
    assert cfg.prefix == runner.control_prefix("train-x")
    assert cfg.s3["s3_endpoint"] == "127.0.0.1:9"
    assert LoopConfig(**cfg.to_dict()) == cfg


def test_study_defaults_in_settings() -> None:
    s = settings()
    assert (s.learning_rate_first, s.learning_rate_later, s.momentum) == (0.01, 0.005, 0.9)
    assert s.per_class_cap == 1000 and s.max_failures == 3
    assert s.max_accuracy_drop == pytest.approx(0.01)


def test_augmentation_fills_with_the_crop_background() -> None:
    # Crops are white outside the cell; what a shift pulls in must be white too.
    assert CROP_FILL[0] / 255.0 == CROP_BACKGROUND
    white = torch.ones(2, 3, 32, 32)
    params = AugmentParams(rotation_deg=(45.0, 45.0), max_shift=0.125)
    out = augment(white, seeded_generator(0), params, CROP_BACKGROUND)
    assert np.allclose(out.numpy(), 1.0, atol=1e-5)


def test_only_a_bootstrap_round_has_the_absolute_gate() -> None:
    from services.trainer.plan import bootstrap_gate

    assert bootstrap_gate({"strategy": "bootstrap", "params": {}}) == 0.80
    assert bootstrap_gate({"strategy": "bootstrap", "params": {"gate": 0}}) == 0.80
    assert bootstrap_gate({"strategy": "bootstrap", "params": {"gate": 0.9}}) == 0.9
    assert bootstrap_gate({"strategy": "cst+al", "params": {"gate": 0.9}}) is None
    assert bootstrap_gate(None) is None
    old = plan().to_json()
    for key in ("gate", "test_set"):  # a job stored before these fields resumes
        old.pop(key)
    assert Plan.from_json(old).gate is None


def test_test_set_is_described_by_its_specimens_and_classes() -> None:
    from bmcell.trainset import LabelledCell
    from services.trainer.plan import describe_test_set

    def cells(code: str, n: int, specimen: int) -> list[LabelledCell]:
        return [LabelledCell(i, code, 0, "test", specimen, True) for i in range(n)]

    balanced = [c for code in DEFAULT_TAXONOMY.codes for c in cells(code, 25, 1)]
    # Twice 25 per training class: 50 per evaluation class, 100 in BN+ART (merged).
    assert describe_test_set(balanced + balanced, DEFAULT_TAXONOMY).startswith(
        "test specimens: 850 cells from 1 specimen, 50-100 per evaluation class, 16 of 16"
    )
    uneven = cells("MB", 3, 1) + cells("LY", 5, 2)
    assert describe_test_set(uneven, DEFAULT_TAXONOMY) == (
        "test specimens: 8 cells from 2 specimens, 3-5 per evaluation class, 2 of 16 classes"
    )
    assert describe_test_set([], DEFAULT_TAXONOMY).startswith("no test set")
