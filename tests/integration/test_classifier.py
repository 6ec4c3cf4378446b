"""Classifier service through real Triton, and selection on its predictions."""

from __future__ import annotations

import io
import os
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from bmcell import modelstore, preprocess, thumbs, triton
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
def classifier(stack: Stack, operator_channel):
    with operator_channel(stack.config.addr("classifier")) as ch:
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


def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("request_", "named"),
    [
        (lambda: {"cell_ids": list(range(1, 10_002))}, "BMCELL_MAX_CLASSIFY_CELLS"),
        (lambda: {"images": [b"x"] * 257}, "BMCELL_MAX_CLASSIFY_IMAGES"),
        # 1100 x 1100 = 1.21 M pixels, over the classifier's 1 M per crop; ~10 KB as PNG.
        (
            lambda: {"images": [_encoded(Image.new("RGB", (1100, 1100)), "PNG")]},
            "images[0]: pixel dimensions 1100x1100 are beyond the limit of 1000000 pixels "
            "(BMCELL_MAX_IMAGE_PIXELS)",
        ),
        (
            lambda: {
                "images": [
                    synth_crops(1, seed=2)[0][0],
                    _encoded(
                        Image.new("RGB", (64, 64)),
                        "TIFF",
                        save_all=True,
                        append_images=[Image.new("RGB", (64, 64))],
                    ),
                ]
            },
            "images[1]: more than 1 frame(s)",
        ),
    ],
)
def test_classify_caps_name_the_limit_and_its_setting(classifier, v1, request_, named) -> None:
    with pytest.raises(grpc.RpcError) as err:
        classifier.Classify(classifier_pb2.ClassifyRequest(**request_()), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in err.value.details()


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


def _stored_predictions(db, cells: list[int], version: int) -> np.ndarray:
    with db.connection() as conn:
        rows = conn.execute(
            "SELECT cell_id, probabilities FROM predictions "
            "WHERE cell_id = ANY(%s) AND model_version = %s",
            (cells, version),
        ).fetchall()
    by_cell = {r["cell_id"]: r["probabilities"] for r in rows}
    assert sorted(by_cell) == sorted(cells)
    return np.array([by_cell[c] for c in cells], dtype=np.float32)


def _in_process(db, store, model: torch.nn.Module, cells: list[int]) -> np.ndarray:
    """The version's TorchScript in this process on each cell's stored PNG crop."""
    with db.connection() as conn:
        keys = {
            r["id"]: r["crop_key"]
            for r in conn.execute(
                "SELECT id, crop_key FROM cells WHERE id = ANY(%s)", (cells,)
            ).fetchall()
        }
    x = np.stack([preprocess.crop_to_tensor(store.get(keys[c]), INPUT) for c in cells])
    scripted = torch.jit.script(WithSoftmax(model).eval())
    with torch.inference_mode():
        return scripted(torch.from_numpy(x)).numpy()


def test_pool_predictions_from_thumbs_equal_in_process_torchscript(rt, classifier, v1) -> None:
    settings, db, store = rt
    version, model = v1
    # 282 px crops, as the segmenter stores them, with their thumbs stored beside them;
    # 150 cells at batch 16: several groups in flight at once, the last one partial.
    images, _ = synth_crops(150, seed=21, size=282)
    cells = seed_cells(db, store, images)
    thumbs.fetch(db, store, cells, INPUT)
    updates = list(
        classifier.PredictPool(
            classifier_pb2.PredictPoolRequest(cell_ids=cells, batch_size=16), timeout=120
        )
    )
    assert [u.done for u in updates] == sorted(u.done for u in updates)  # progress grows
    assert updates[-1].finished and updates[-1].written == 150 and len(updates) > 3
    want = _in_process(db, store, model, cells)
    np.testing.assert_allclose(_stored_predictions(db, cells, version), want, atol=1e-5)
    # Classify by cell id reads the same thumbs.
    resp = classifier.Classify(classifier_pb2.ClassifyRequest(cell_ids=cells[:20]), timeout=60)
    got = np.array([r.probabilities for r in resp.results], dtype=np.float32)
    np.testing.assert_allclose(got, want[:20], atol=1e-5)


def test_cell_whose_thumb_is_missing_is_still_predicted(rt, classifier, v1) -> None:
    settings, db, store = rt
    version, model = v1
    images, _ = synth_crops(30, seed=22, size=282)
    cells = seed_cells(db, store, images)
    thumbs.fetch(db, store, cells, INPUT)
    lost = cells[7]
    with db.transaction() as conn:
        conn.execute("DELETE FROM cell_thumbs WHERE cell_id = %s", (lost,))
    updates = list(
        classifier.PredictPool(classifier_pb2.PredictPoolRequest(cell_ids=cells), timeout=120)
    )
    assert updates[-1].finished and updates[-1].written == 30
    want = _in_process(db, store, model, cells)
    np.testing.assert_allclose(_stored_predictions(db, cells, version), want, atol=1e-5)
    with db.connection() as conn:  # made from the crop and stored again for next time
        n = conn.execute(
            "SELECT count(*) AS n FROM cell_thumbs WHERE cell_id = %s AND size = %s",
            (lost, INPUT),
        ).fetchone()["n"]
    assert n == 1


def test_predict_pool_with_an_unknown_cell_writes_nothing(rt, classifier, v1) -> None:
    settings, db, store = rt
    version, _ = v1
    images, _ = synth_crops(5, seed=23)
    cells = seed_cells(db, store, images)
    with pytest.raises(grpc.RpcError) as err:
        list(
            classifier.PredictPool(
                classifier_pb2.PredictPoolRequest(cell_ids=[*cells, 10**12]), timeout=60
            )
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and str(10**12) in err.value.details()
    with db.connection() as conn:
        n = conn.execute(
            "SELECT count(*) AS n FROM predictions WHERE cell_id = ANY(%s)", (cells,)
        ).fetchone()["n"]
    assert n == 0


def test_selection_matches_the_pure_rules(rt, stack: Stack, v1, operator_channel) -> None:
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
    with operator_channel(stack.config.addr("selector")) as ch:
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
        audited = conn.execute(
            "SELECT action, detail FROM audit_log WHERE entity = 'round' AND entity_id = %s",
            (str(round_id),),
        ).fetchall()
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
    # One selection, audited once: the repeated call and the refused one wrote nothing.
    assert [(a["action"], a["detail"]["tasks"]) for a in audited] == [
        ("selection.create", len(tasks))
    ]


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
    # One version per page: the same versions in the same order, active on every page.
    paged, token = [], ""
    while True:
        page = classifier.ListModels(
            classifier_pb2.ListModelsRequest(page_size=1, page_token=token), timeout=30
        )
        assert len(page.versions) <= 1 and page.active_version == v1[0]
        paged += [v.version for v in page.versions]
        token = page.next_page_token
        if not token:
            break
    assert paged == [v.version for v in listed.versions] and len(paged) >= 2

    # A third version asked for by name is loaded beside the active one only: Triton
    # holds two versions' instances, not every version the model ever had.
    v3 = modelstore.register_version(
        db, store, peaky_model(3), DEFAULT_TAXONOMY, INPUT, model_name=settings.model_name
    )
    r = classifier.Classify(
        classifier_pb2.ClassifyRequest(images=images, model_version=v3), timeout=300
    )
    assert r.model_version == v3
    served = triton.client(os.environ["BMCELL_TRITON_URL"])
    try:
        ready = {v: served.is_model_ready(settings.model_name, str(v)) for v in (v1[0], v2, v3)}
    finally:
        served.close()
    assert ready == {v1[0]: True, v2: False, v3: True}
    # ... and one unloaded is served again on demand.
    r = classifier.Classify(
        classifier_pb2.ClassifyRequest(images=images, model_version=v2), timeout=300
    )
    assert r.model_version == v2
