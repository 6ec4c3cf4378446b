"""The bootstrap's pure parts: the seed a round is started with reaches its waves,
waves draw only where a class is short, and shortfalls name their classes."""

from __future__ import annotations

import numpy as np

from bmcell.taxonomy import DEFAULT_TAXONOMY
from bmcell.v1 import rounds_pb2, selector_pb2
from services.rounds.driver import bootstrap_params, quotas, shortfalls, wave_sample
from services.rounds.server import round_params


def _params(seed: int | None) -> dict:
    selection = selector_pb2.SelectionParameters(labs=["lab-a"])
    if seed is not None:
        selection.seed = seed
    request = rounds_pb2.StartRoundRequest(
        experiment="e", strategy="bootstrap", selection=selection, initial_per_class=3
    )
    # What the service stores and the driver reads back (params is jsonb).
    return bootstrap_params(round_params(request))


def _first_wave(seed: int, wave: int = 0) -> tuple[list[int], list[int]]:
    train, test = wave_sample(
        np.arange(10_000, dtype=np.int64),
        np.arange(20_000, 21_000, dtype=np.int64),
        seed=seed,
        wave=wave,
        size=50,
        want_train=True,
        want_test=True,
    )
    return train.tolist(), test.tolist()


def test_the_selection_seed_reaches_the_waves() -> None:
    assert _params(5)["seed"] == 5
    assert _params(0)["seed"] == 0
    assert _params(None)["seed"] == 0  # the default
    assert _params(5)["initial_per_class"] == 3 and _params(5)["labs"] == ["lab-a"]
    same = _first_wave(_params(5)["seed"])
    assert same == _first_wave(_params(5)["seed"])
    assert same != _first_wave(_params(6)["seed"])
    assert same[0] != _first_wave(5, wave=1)[0]  # each wave its own draw
    assert len(same[0]) == 50 and len(same[1]) == 25


def test_a_wave_draws_only_where_a_class_is_short() -> None:
    train, test = wave_sample(
        np.arange(100, dtype=np.int64),
        np.arange(100, 200, dtype=np.int64),
        seed=1,
        wave=0,
        size=600,
        want_train=True,
        want_test=False,
    )
    assert train.tolist() == list(range(100)) and test.size == 0


def test_shortfalls_name_the_short_classes() -> None:
    p = bootstrap_params({"initial_per_class": 3, "validation_per_class": 2, "test_per_class": 2})
    want_train, want_test = quotas(p)
    assert want_train["LY"] == 5 and want_train["BN"] == 4  # BN and ART share validation
    have_train = dict(want_train)
    have_test = {code: 2 for code in DEFAULT_TAXONOMY.codes}
    assert shortfalls(p, have_train, have_test) == ([], [])
    have_train["MB"] = 4
    del have_test["PC"]
    short_train, short_test = shortfalls(p, have_train, have_test)
    assert short_train == ["MB"]
    assert DEFAULT_TAXONOMY.eval_merge.get("PC", "PC") in short_test and len(short_test) == 1
