"""``bmcell models`` and ``bmcell classify`` against the session's stack, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bmcell import modelstore, tls
from bmcell.db import Database
from bmcell.settings import Settings, load
from bmcell.stack import Stack
from bmcell.storage import ObjectStore
from bmcell.taxonomy import DEFAULT_TAXONOMY
from bmcell.v1 import classifier_pb2, classifier_pb2_grpc
from tests.integration.seed import synth_crops
from tests.integration.test_classifier import INPUT, peaky_model

pytestmark = pytest.mark.integration


def bmcell(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI with the stack's environment (the session fixture put it in os.environ)."""
    return subprocess.run(
        [sys.executable, "-m", "bmcell.cli.main", *args],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=360,
    )


@pytest.fixture(scope="module")
def versions(stack: Stack) -> tuple[int, int]:
    """Two versions registered here; the first is active when the tests start."""
    settings = load(Settings)
    db = Database(settings).open()
    store = ObjectStore(settings).ensure_buckets()
    try:
        va, vb = (
            modelstore.register_version(
                db,
                store,
                peaky_model(seed),
                DEFAULT_TAXONOMY,
                INPUT,
                model_name=settings.model_name,
                note=f"cli test {seed}",
            )
            for seed in (21, 22)
        )
    finally:
        db.close()
    with tls.grpc_channel(stack.config.addr("classifier")) as ch:
        classifier_pb2_grpc.ClassifierStub(ch).ActivateModel(
            classifier_pb2.ActivateModelRequest(version=va), timeout=300
        )
    return va, vb


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("crops")
    images, _ = synth_crops(2, seed=13)
    paths = []
    for i, data in enumerate(images):
        p = folder / f"cell{i}.png"
        p.write_bytes(data)
        paths.append(p)
    return paths


def _listed(res: subprocess.CompletedProcess[str]) -> dict:
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_models_list_json(versions) -> None:
    va, vb = versions
    out = _listed(bmcell("models", "list", "--json"))
    assert out["active_version"] == va
    by_version = {v["version"]: v for v in out["versions"]}
    assert by_version[va]["active"] and by_version[va]["state"] == "active"
    assert not by_version[vb]["active"] and by_version[vb]["note"] == "cli test 22"
    assert by_version[va]["input_size"] == INPUT
    assert by_version[va]["classes"] == DEFAULT_TAXONOMY.codes
    table = bmcell("models", "list")
    assert table.returncode == 0, table.stderr
    assert "cli test 21" in table.stdout


def test_classify_two_pngs_json(versions, pngs) -> None:
    va, _ = versions
    res = bmcell("classify", *map(str, pngs), "--json", "--top", "3")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert [e["path"] for e in out] == [str(p) for p in pngs]
    for e in out:
        assert e["model_version"] == va
        assert list(e["probabilities"]) == DEFAULT_TAXONOMY.codes
        assert sum(e["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert len(e["top"]) == 3
        probs = [t["probability"] for t in e["top"]]
        assert probs == sorted(probs, reverse=True)
        assert e["top"][0]["probability"] == max(e["probabilities"].values())
        assert {t["class"] for t in e["top"]} <= set(DEFAULT_TAXONOMY.codes)
    # a folder gives the same files; the text form names file, classes and version
    text = bmcell("classify", str(pngs[0].parent))
    assert text.returncode == 0, text.stderr
    lines = text.stdout.strip().splitlines()
    assert len(lines) == 2 and all(f"(v{va})" in line for line in lines)


def test_activate_and_rollback(versions, pngs) -> None:
    va, vb = versions
    res = bmcell("models", "activate", str(vb))
    assert res.returncode == 0, res.stderr
    assert f"version {vb}" in res.stdout
    assert _listed(bmcell("models", "list", "--json"))["active_version"] == vb
    out = json.loads(bmcell("classify", str(pngs[0]), "--json").stdout)
    assert out[0]["model_version"] == vb
    pinned = json.loads(bmcell("classify", str(pngs[0]), "--json", "--version", str(va)).stdout)
    assert pinned[0]["model_version"] == va
    res = bmcell("models", "rollback")
    assert res.returncode == 0, res.stderr
    assert f"version {va}" in res.stdout
    assert _listed(bmcell("models", "list", "--json"))["active_version"] == va


def test_classify_non_image_is_invalid_argument(versions, tmp_path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    res = bmcell("classify", str(bad))
    assert res.returncode == 1
    assert "INVALID_ARGUMENT" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.stderr


def test_unknown_version_is_one_line_error(versions) -> None:
    res = bmcell("models", "activate", "999999")
    assert res.returncode == 1
    assert res.stderr.startswith("error: ") and "Traceback" not in res.stderr


def test_missing_address_names_the_variable(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "BMCELL_CLASSIFIER_ADDR"}
    # point the stack env file somewhere empty so the CLI cannot fill the variable in
    env["BMCELL_STACK_RUN_DIR"] = str(tmp_path)
    res = subprocess.run(
        [sys.executable, "-m", "bmcell.cli.main", "models", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2  # a usage error, like every command missing an address
    assert "BMCELL_CLASSIFIER_ADDR" in res.stderr and "bmcell stack up" in res.stderr
