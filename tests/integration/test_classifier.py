"""Classifier service through real Triton, and selection on its predictions."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import torch

from bmcell import modelstore, preprocess, tls
from bmcell import selection as rules
from bmcell.network import WithSoftmax
from bmcell.stack import Stack
from bmcell.taxonomy import DEFAULT_TAXONOMY
from bmcell.v1 import (
    classifier_pb2,
    classifier_pb2_grpc,
    selector_pb2,
    selector_pb2_grpc,
)
from tests.integration.seed import seed_cells, synth_crops

pytestmark = pytest.mark.integration
INPUT = 64


class ColourProbe(torch.nn.Module):
    """Logits from a crop's colour statistics through random weights.

    An untrained CellClassifier answers nearly uniform probabilities for every crop,
    which would leave CST with nothing to pick; this model's answers range from sure
    to torn, so one selection exercises CST and AL. It is served like any version.
    """

    def __init__(self, num_classes: int, seed: int, scale: float = 30.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = torch.nn.Linear(6, num_classes)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(num_classes, 6, generator=g) * scale)
            self.lin.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.cat([x.mean((2, 3)) - 0.8, x.std((2, 3)) - 0.15], 1))


def peaky_model(seed: int) -> torch.nn.Module:
    return ColourProbe(DEFAULT_TAXONOMY.num_classes, seed).eval()


@pytest.fixture(scope="module")
def classifier(stack: Stack):
    with tls.grpc_channel(stack.config.addr("classifier")) as ch:
        yield classifier_pb2_grpc.ClassifierStub(ch)


@pytest.fixture(scope="module")
def v1(rt, classifier) -> tuple[int, torch.nn.Module]:
    settings, db, store = rt
    model = peaky_model(1)
    version = modelstore.register_version(
        db, store, model, DEFAULT_TAXONOMY, INPUT, model_name=settings.model_name, note="test v1"
    )
    classifier.ActivateModel(classifier_pb2.ActivateModelRequest(version=version), timeout=300)
    return version, model


def test_service_equals_in_process_torchscript(classifier, v1) -> None:
    version, model = v1
    images, _ = synth_crops(12, seed=3)
    resp = classifier.Classify(classifier_pb2.ClassifyRequest(images=images), timeout=60)
    assert resp.model_version == version
    got = np.array([r.probabilities for r in resp.results], dtype=np.float32)
    scripted = torch.jit.script(WithSoftmax(model).eval())
    with torch.inference_mode():
        want = scripted(torch.from_numpy(preprocess.batch_from_crops(images, INPUT))).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert list(resp.results[0].classes) == DEFAULT_TAXONOMY.codes


def test_bad_input_is_invalid_argument(classifier, v1) -> None:
    with pytest.raises(grpc.RpcError) as err:
        classifier.Classify(classifier_pb2.ClassifyRequest(images=[b"not an image"]), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "images" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        classifier.Classify(classifier_pb2.ClassifyRequest(), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        classifier.Classify(classifier_pb2.ClassifyRequest(cell_ids=[10**12]), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_predict_pool_writes_once(rt, classifier, v1) -> None:
    settings, db, store = rt
    version, _ = v1
    images, _ = synth_crops(40, seed=5)
    cells = seed_cells(db, store, images)
    updates = list(
        classifier.PredictPool(
            classifier_pb2.PredictPoolRequest(cell_ids=cells, batch_size=16), timeout=120
        )
    )
    assert updates[-1].finished and updates[-1].done == 40 and updates[-1].written == 40
    again = list(
        classifier.PredictPool(classifier_pb2.PredictPoolRequest(cell_ids=cells), timeout=120)
    )
    assert again[-1].written == 0 and again[-1].done == 40
    with db.connection() as conn:
        n = conn.execute(
            "SELECT count(*) AS n FROM predictions WHERE cell_id = ANY(%s) AND model_version = %s",
            (cells, version),
        ).fetchone()["n"]
    assert n == 40


def test_selection_matches_the_pure_rules(rt, stack: Stack, v1) -> None:
    settings, db, store = rt
    images, _ = synth_crops(120, seed=7)
    lab = "lab-select"
    cells = seed_cells(db, store, images, lab=lab)
    with db.transaction() as conn:
        round_id = conn.execute(
            "INSERT INTO rounds (experiment, number, strategy) VALUES ('sel-test', 1, 'cst+al') "
            "RETURNING id"
        ).fetchone()["id"]
    params = selector_pb2.SelectionParameters(
        sample_size=80, cst_threshold=0.9, al_margin=0.2, seed=11, labs=[lab]
    )
    with tls.grpc_channel(stack.config.addr("selector")) as ch:
        stub = selector_pb2_grpc.SelectorStub(ch)
        first = stub.SelectCandidates(
            selector_pb2.SelectCandidatesRequest(
                round_id=round_id, strategy="cst+al", parameters=params
            ),
            timeout=300,
        )
        again = stub.SelectCandidates(
            selector_pb2.SelectCandidatesRequest(
                round_id=round_id, strategy="cst+al", parameters=params
            ),
            timeout=60,
        )
        with pytest.raises(grpc.RpcError) as err:
            stub.SelectCandidates(
                selector_pb2.SelectCandidatesRequest(
                    round_id=round_id, strategy="magic", parameters=params
                ),
                timeout=60,
            )
    assert (
        err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "strategy" in err.value.details()
    )
    assert not first.existing and again.existing
    assert first.pool_size == 120 and first.sample_size == 80
    sample = rules.sample_pool(np.array(cells), 80, 11)
    with db.connection() as conn:
        P = np.array(
            [
                conn.execute(
                    "SELECT probabilities FROM predictions WHERE cell_id = %s AND model_version = %s",
                    (int(c), v1[0]),
                ).fetchone()["probabilities"]
                for c in sample
            ],
            dtype=np.float32,
        )
        tasks = conn.execute(
            "SELECT cell_id, kind, suggested_class, top_classes FROM review_tasks "
            "WHERE round_id = %s",
            (round_id,),
        ).fetchall()
        statuses = {
            r["status"]
            for r in conn.execute(
                "SELECT status FROM cells WHERE id = ANY(%s)", ([t["cell_id"] for t in tasks],)
            )
        }
    want = rules.select("cst+al", P, rules.SelectionParams(0.9, 0.2), 11)
    assert want.cst.size and want.al.size, "the test model should give both kinds"
    got_cst = {t["cell_id"] for t in tasks if t["kind"] == "cst"}
    got_al = {t["cell_id"] for t in tasks if t["kind"] == "al"}
    assert got_cst == {int(sample[i]) for i in want.cst}
    assert got_al == {int(sample[i]) for i in want.al}
    assert len(tasks) == first.tasks_created == again.tasks_created == len(got_cst) + len(got_al)
    codes = DEFAULT_TAXONOMY.codes
    for t in tasks:
        row = int(np.flatnonzero(sample == t["cell_id"])[0])
        assert t["top_classes"][0] == codes[int(P[row].argmax())]
        if t["kind"] == "cst":
            assert t["suggested_class"] == t["top_classes"][0]
    assert statuses == {"pending"}


def test_activation_under_load_fails_no_call(rt, classifier, v1) -> None:
    settings, db, store = rt
    images, _ = synth_crops(2, seed=9)
    v2 = modelstore.register_version(
        db,
        store,
        peaky_model(2),
        DEFAULT_TAXONOMY,
        INPUT,
        model_name=settings.model_name,
        note="test v2",
    )
    answers: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                r = classifier.Classify(classifier_pb2.ClassifyRequest(images=images), timeout=60)
                answers.append(r.model_version)
            except grpc.RpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}")

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    classifier.ActivateModel(classifier_pb2.ActivateModelRequest(version=v2), timeout=300)
    time.sleep(2.5)
    stop.set()
    for t in threads:
        t.join()
    assert not failures, failures[:3]
    assert set(answers) <= {v1[0], v2}
    assert answers[0] == v1[0] and answers[-1] == v2
    rolled = classifier.RollbackModel(classifier_pb2.RollbackModelRequest(), timeout=300)
    assert rolled.version == v1[0] and rolled.state == "active"
    listed = classifier.ListModels(classifier_pb2.ListModelsRequest(), timeout=30)
    assert listed.active_version == v1[0]
