"""Labelled cells in and out (issue 15): ImageFolder import, exports with images.

Everything goes through the labeling API with an operator's token, as `bmcell import`
and `bmcell export` do (their functions are called in-process); the checks read
Postgres and object storage directly. Labels on segmented cells (for the COCO export)
and the round they belong to are seeded with SQL, as tests/integration/test_trainer.py
seeds its studies: the point here is what leaves, not how it was reviewed.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bmcell import datasets, http_client
from bmcell.cli import datasets as cli
from bmcell.errors import InvalidArgument
from bmcell.stack import Stack
from bmcell.synth import generate_dataset, lab_style, render_crop
from bmcell.taxonomy import DEFAULT_TAXONOMY
from bmcell.v1 import trainer_pb2, trainer_pb2_grpc

pytestmark = pytest.mark.integration

CLASSES = ("LY", "MB", "PMC", "Seg")
PER_CLASS = 4


@pytest.fixture(scope="module")
def api(stack: Stack, operator_token: str):
    with http_client.client(stack.env()["BMCELL_LABELAPI_URL"], operator_token) as client:
        yield client


def _crop_bytes(rng, code: str, size: int, fmt: str) -> bytes:
    image, _ = render_crop(rng, lab_style(7, "lab-x"), code, size=size)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


def _imagefolder(root: Path, names: dict[str, str]) -> Path:
    """``names`` folder -> code; sizes and formats vary as a CellaVision export's do."""
    rng = np.random.default_rng(11)
    for folder, code in names.items():
        (root / folder).mkdir(parents=True)
        for i in range(PER_CLASS):
            fmt, ext = (("JPEG", "jpg"), ("PNG", "png"), ("TIFF", "tif"))[i % 3]
            size = (360, 200, 96, 282)[i % 4]
            (root / folder / f"{code}-{i}.{ext}").write_bytes(_crop_bytes(rng, code, size, fmt))
    return root


def _state(rt, lab: str) -> dict:
    _settings, db, store = rt
    with db.connection() as conn:
        cells = conn.execute(
            """SELECT c.id, c.crop_key, c.mask_key, c.field_id, l.class_code, l.source,
                      l.labelled_by
                 FROM cells c JOIN labs lb ON lb.id = c.lab_id
                 LEFT JOIN labels l ON l.cell_id = c.id
                WHERE lb.code = %s ORDER BY c.id""",
            (lab,),
        ).fetchall()
        audit = conn.execute(
            "SELECT count(*) AS n FROM audit_log WHERE action = 'cell.import'"
        ).fetchone()["n"]
    return {"cells": cells, "audit": audit, "objects": set(store.list("cells/"))}


def _import(api, lab: str, specimen: str, root: Path, mapping=None) -> cli.ImportSummary:
    taxonomy = cli.server_taxonomy(api)
    return cli.import_folder(
        api, lab=lab, specimen=specimen, root=root, mapping=mapping or {}, taxonomy=taxonomy
    )


def test_import_refuses_bad_input_file_by_file_and_reimport_is_a_noop(
    api, rt, tmp_path: Path
) -> None:
    lab = f"imp-{uuid.uuid4().hex[:6]}"
    root = _imagefolder(tmp_path / "set", {"LY": "LY", "Blast": "MB", "Smudge": "ART"})
    before = _state(rt, lab)

    # An unmapped folder name: refused up front, every one listed, nothing written.
    (root / "Giant platelet").mkdir()
    (root / "Giant platelet" / "x.png").write_bytes((root / "LY" / "LY-1.png").read_bytes())
    with pytest.raises(InvalidArgument) as err:
        _import(api, lab, "s1", root, {"Smudge": "ART"})
    assert "Blast, Giant platelet" in str(err.value)
    assert _state(rt, lab) == before
    (root / "Giant platelet" / "x.png").unlink()
    (root / "Giant platelet").rmdir()

    # Bad files among good ones: each refused with its reason, the rest imported.
    bad = root / "LY"
    good_jpeg = (bad / "LY-0.jpg").read_bytes()
    (bad / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    (bad / "not-an-image.jpg").write_bytes(b"hello, I am text")
    (bad / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    huge = io.BytesIO()
    Image.new("RGB", (5000, 4000), (250, 250, 250)).save(huge, format="PNG")
    (bad / "huge-pixels.png").write_bytes(huge.getvalue())
    noise = np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)
    big = io.BytesIO()
    Image.fromarray(noise).save(big, format="PNG")
    assert len(big.getvalue()) > 1024 * 1024
    (bad / "huge-bytes.png").write_bytes(big.getvalue())
    wide = io.BytesIO()
    Image.new("F", (64, 64), 0.5).save(wide, format="TIFF")
    (bad / "float.tif").write_bytes(wide.getvalue())
    (bad / "notes.txt").write_text("not a crop")

    mapping = {"Blast": "MB", "Smudge": "ART"}
    summary = _import(api, lab, "s1", root, mapping)
    refused = dict(summary.refused)
    assert len(summary.imported) == 3 * PER_CLASS, summary.to_json()
    assert set(refused) == {
        f"LY/{n}"
        for n in (
            "corrupt.png",
            "not-an-image.jpg",
            "truncated.jpg",
            "huge-pixels.png",
            "huge-bytes.png",
            "float.tif",
            "notes.txt",
        )
    }, refused
    assert "400" in refused["LY/corrupt.png"] and "413" in refused["LY/huge-bytes.png"]
    assert "BMCELL_IMPORT_MAX_PIXELS" in refused["LY/huge-pixels.png"]
    assert "mode F" in refused["LY/float.tif"]
    assert summary.by_class == {"LY": PER_CLASS, "MB": PER_CLASS, "ART": PER_CLASS}

    after = _state(rt, lab)
    cells = after["cells"]
    assert len(cells) == 3 * PER_CLASS
    assert {c["source"] for c in cells} == {"import"}
    assert all(c["field_id"] is None and c["labelled_by"] for c in cells)
    assert after["audit"] - before["audit"] == 3 * PER_CLASS
    # Nothing half-written: the new objects are exactly the new rows' crops and masks.
    referenced = {k for c in cells for k in (c["crop_key"], c["mask_key"])}
    assert after["objects"] - before["objects"] <= referenced <= after["objects"]
    _settings, db, store = rt
    for c in cells[:3]:
        with Image.open(io.BytesIO(store.get(c["crop_key"]))) as img:
            assert img.size == (282, 282) and img.format == "PNG" and not img.getexif()
    with db.connection() as conn:
        assert conn.execute(
            "SELECT count(*) AS n FROM cell_thumbs WHERE cell_id = ANY(%s)",
            ([c["id"] for c in cells],),
        ).fetchone()["n"] == len(cells)

    # Again: every good file is a duplicate, nothing changes.
    again = _import(api, lab, "s1", root, mapping)
    assert not again.imported and len(again.duplicate) == 3 * PER_CLASS
    assert _state(rt, lab) == after


def test_import_is_refused_to_a_reviewer(stack: Stack, admin_token: str, api) -> None:
    from bmcell import scenario

    api_url = stack.env()["BMCELL_LABELAPI_URL"]
    lab = f"rev-{uuid.uuid4().hex[:6]}"
    assert api.post("/v1/labs", json={"code": lab, "name": ""}).status_code == 201
    token = scenario.person_token(api_url, admin_token, lab, role="reviewer", labs=[lab])
    with http_client.client(api_url, token) as c:
        resp = c.post(f"/v1/labs/{lab}/specimens/y/crops", params={"class": "LY"}, content=b"x")
    assert resp.status_code == 403, resp.text


def _round(db, experiment: str, number: int = 1) -> int:
    with db.transaction() as conn:
        return conn.execute(
            "INSERT INTO rounds (experiment, number, strategy, state) "
            "VALUES (%s, %s, 'cst', 'published') RETURNING id",
            (experiment, number),
        ).fetchone()["id"]


def _export(api, fmt: str, **params) -> bytes:
    resp = api.get("/v1/labels/export", params={"format": fmt, **params}, timeout=300)
    assert resp.status_code == 200, resp.text
    return resp.content


def test_export_import_round_trip_preserves_every_label_and_trains(
    api, rt, stack: Stack, operator_channel, tmp_path: Path
) -> None:
    _settings, db, store = rt
    src = f"rt-src-{uuid.uuid4().hex[:6]}"
    root = _imagefolder(tmp_path / "src", {c: c for c in CLASSES})
    assert len(_import(api, src, "s1", root).imported) == len(CLASSES) * PER_CLASS
    source = _state(rt, src)["cells"]

    data = _export(api, "imagefolder", lab=src)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = set(zf.namelist())
        manifest = zf.read("manifest.csv").decode().splitlines()
        out = tmp_path / "export"
        zf.extractall(out)
    assert names == {f"{c['class_code']}/{c['id']}.png" for c in source} | {"manifest.csv"}
    assert manifest[0].split(",") == list(
        ("cell_id", "lab", "specimen", "class_code", "source", "reviewers", "model_version")
    ) + ["round", "file"]
    assert len(manifest) == 1 + len(source)
    (out / "manifest.csv").unlink()

    # The same labels again, in an empty lab: every crop with its class (a 282 px
    # crop fits the frame as it is, so it comes back under the same content address).
    same = f"rt-same-{uuid.uuid4().hex[:6]}"
    assert len(_import(api, same, "s1", out).imported) == len(source)
    got = _state(rt, same)["cells"]
    assert sorted((c["crop_key"], c["class_code"]) for c in got) == sorted(
        (c["crop_key"], c["class_code"]) for c in source
    )

    # Another lab's taxonomy mapping that merges promyelocytes into myeloblasts.
    merged = f"rt-merged-{uuid.uuid4().hex[:6]}"
    mapping = datasets.parse_mapping("PMC: MB\n")
    assert len(_import(api, merged, "s1", out, mapping).imported) == len(source)
    by_key = {c["crop_key"]: c["class_code"] for c in _state(rt, merged)["cells"]}
    for c in source:
        assert by_key[c["crop_key"]] == ("MB" if c["class_code"] == "PMC" else c["class_code"])

    # Train there: a round of a fresh experiment sees the imported labels.
    round_id = _round(db, f"imported-{uuid.uuid4().hex[:6]}")
    with operator_channel(stack.config.addr("trainer")) as ch:
        trainer = trainer_pb2_grpc.TrainerStub(ch)
        job = trainer.StartTraining(
            trainer_pb2.StartTrainingRequest(
                round_id=round_id, epochs=1, input_size=32, batch_size=16
            ),
            timeout=60,
        )
        final = list(trainer.WatchJob(trainer_pb2.GetJobRequest(job_id=job.job_id), timeout=600))
    assert final[-1].state == "succeeded", final[-1]
    with db.connection() as conn:
        plan = conn.execute(
            "SELECT config FROM training_jobs WHERE id = %s", (job.job_id,)
        ).fetchone()["config"]
    trained = {c for _, _, c in plan["train"]}
    assert {c["id"] for c in _state(rt, merged)["cells"]} <= trained


def test_coco_export_of_segmented_fields_loads_with_pycocotools(
    api, rt, stack: Stack, tmp_path: Path
) -> None:
    coco_mod = pytest.importorskip("pycocotools.coco")
    _settings, db, _store = rt
    lab = f"coco-{uuid.uuid4().hex[:6]}"
    manifest = generate_dataset(tmp_path / "synth", labs=1, specimens=1, fields=1, seed=21)
    image = manifest.root / manifest.specimens[0].fields[0].image
    env = {**os.environ, "COLUMNS": "200"}
    up = subprocess.run(
        [sys.executable, "-m", "bmcell.cli.main", "upload", "--lab", lab, "--specimen", "s1",
         str(image)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert up.returncode == 0, up.stderr[-2000:]
    experiment = f"coco-{uuid.uuid4().hex[:6]}"
    round_id = _round(db, experiment, number=3)
    with db.transaction() as conn:
        cells = conn.execute(
            """SELECT c.id FROM cells c JOIN labs l ON l.id = c.lab_id
                WHERE l.code = %s AND c.status = 'unlabelled' ORDER BY c.id""",
            (lab,),
        ).fetchall()
        assert len(cells) >= 3
        codes = DEFAULT_TAXONOMY.codes
        for i, c in enumerate(cells):
            conn.execute(
                "INSERT INTO labels (cell_id, class_code, source, round_id, round_added) "
                "VALUES (%s, %s, 'cst', %s, 3)",
                (c["id"], codes[i % len(codes)], round_id),
            )
    data = _export(api, "coco", lab=lab, round=3)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        doc = json.loads(zf.read("annotations.json"))
        zf.extractall(tmp_path / "coco")
    path = tmp_path / "coco" / "annotations.json"
    coco = coco_mod.COCO(str(path))
    assert len(coco.getAnnIds()) == len(cells) and len(coco.getImgIds()) == 1
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == DEFAULT_TAXONOMY.codes
    img = coco.loadImgs(coco.getImgIds())[0]
    with Image.open(tmp_path / "coco" / img["file_name"]) as field:
        assert field.size == (img["width"], img["height"])
    for ann in coco.loadAnns(coco.getAnnIds()):
        mask = coco.annToMask(ann)
        assert mask.shape == (img["height"], img["width"]) and mask.sum() == ann["area"] > 0
        x, y, w, h = ann["bbox"]
        ys, xs = np.nonzero(mask)
        assert xs.min() >= x and ys.min() >= y and xs.max() < x + w and ys.max() < y + h
    assert {a["id"] for a in doc["annotations"]} == {c["id"] for c in cells}


def test_export_csv_as_before_and_lab_scoped(stack: Stack, admin_token: str, api) -> None:
    from bmcell import scenario

    api_url = stack.env()["BMCELL_LABELAPI_URL"]
    other = f"other-{uuid.uuid4().hex[:6]}"
    assert api.post("/v1/labs", json={"code": other, "name": ""}).status_code == 201
    token = scenario.person_token(api_url, admin_token, other, role="reviewer", labs=[other])
    with http_client.client(api_url, token) as c:
        resp = c.get("/v1/labels/export", params={"format": "imagefolder"})
        assert resp.status_code == 200
        with zipfile.ZipFile(io.BytesIO(resp.content)) as zf:
            assert zf.namelist() == ["manifest.csv"]  # another lab's cells: none of them
    text = api.get("/v1/labels/export", params={"format": "csv"}).text
    assert text.splitlines()[0].startswith("cell_id,lab,specimen")


def test_the_cli_imports_with_a_summary_and_exports_to_a_file(api, rt, tmp_path: Path) -> None:
    lab = f"cli-{uuid.uuid4().hex[:6]}"
    root = _imagefolder(tmp_path / "set", {"Lymphocyte": "LY", "MB": "MB"})
    (root / "MB" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    (tmp_path / "map.yaml").write_text("Lymphocyte: LY\n")
    env = {**os.environ, "COLUMNS": "200"}

    def bmcell(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "bmcell.cli.main", *args],
            capture_output=True, text=True, env=env, timeout=600,
        )  # fmt: skip

    unmapped = bmcell("import", "--lab", lab, "--specimen", "s1", str(root))
    assert unmapped.returncode == 1 and "Lymphocyte" in unmapped.stderr, unmapped.stderr
    args = ("import", "--lab", lab, "--specimen", "s1", "--map", str(tmp_path / "map.yaml"))
    first = bmcell(*args, str(root))
    assert first.returncode == 2, first.stderr  # one file refused
    assert f"imported {2 * PER_CLASS}, duplicate 0, refused 1" in first.stdout
    assert "refused MB/broken.png: 400" in first.stdout
    assert "importing" in first.stderr  # the progress bar
    again = bmcell(*args, "--json", str(root))
    assert json.loads(again.stdout)["duplicate"] == 2 * PER_CLASS

    out = tmp_path / "out.zip"
    done = bmcell("export", "--format", "imagefolder", "--lab", lab, "--out", str(out))
    assert done.returncode == 0, done.stderr
    with zipfile.ZipFile(out) as zf:
        assert len([n for n in zf.namelist() if n.endswith(".png")]) == 2 * PER_CLASS
    assert not out.with_name("out.zip.part").exists()
