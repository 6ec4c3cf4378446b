"""`stack down && stack up` keeps what was stored: the session's own stack, restarted
whole, serves the same crops, answers Classify with the same model, and the storage
check finds none of their objects missing.

The in-memory S3 server the stack used before forgot every object on `down` while
Postgres kept the rows pointing at them.
"""

from __future__ import annotations

import numpy as np
import pytest

from bmcell import integrity, modelstore
from bmcell.stack import Stack
from bmcell.taxonomy import DEFAULT_TAXONOMY
from bmcell.v1 import classifier_pb2, classifier_pb2_grpc
from tests.integration.seed import seed_cells, synth_crops
from tests.integration.test_classifier import INPUT, peaky_model

pytestmark = pytest.mark.integration


def _classify(
    stack: Stack, operator_channel, cell_ids: list[int]
) -> classifier_pb2.ClassifyResponse:
    with operator_channel(stack.config.addr("classifier")) as ch:
        return classifier_pb2_grpc.ClassifierStub(ch).Classify(
            classifier_pb2.ClassifyRequest(cell_ids=cell_ids), timeout=300
        )


def test_stack_down_and_up_keeps_every_object(stack: Stack, rt, operator_channel) -> None:
    settings, db, store = rt
    crops, _ = synth_crops(6, seed=21)
    cells = seed_cells(db, store, crops)
    with db.connection() as conn:
        keys = {
            r["id"]: r["crop_key"]
            for r in conn.execute(
                "SELECT id, crop_key FROM cells WHERE id = ANY(%s)", (cells,)
            ).fetchall()
        }
    version = modelstore.register_version(
        db, store, peaky_model(21), DEFAULT_TAXONOMY, INPUT, model_name=settings.model_name
    )
    with operator_channel(stack.config.addr("classifier")) as ch:
        classifier_pb2_grpc.ClassifierStub(ch).ActivateModel(
            classifier_pb2.ActivateModelRequest(version=version), timeout=300
        )
    before = _classify(stack, operator_channel, cells)
    crops_before = {cid: store.get(key) for cid, key in keys.items()}

    stack.down()
    stack.up()

    assert {cid: store.get(key) for cid, key in keys.items()} == crops_before
    after = _classify(stack, operator_channel, cells)
    assert after.model_version == before.model_version == version
    np.testing.assert_allclose(
        [r.probabilities for r in after.results], [r.probabilities for r in before.results]
    )
    # Other modules of the session seed rows of their own; this test's rows and
    # version must have every object they name.
    ours = set(keys.values())
    missing = [
        f.key
        for f in integrity.check(db, store).missing
        if f.key in ours or f.key.startswith(f"{settings.model_name}/{version}/")
    ]
    assert missing == []
