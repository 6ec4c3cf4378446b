"""The classifier served by the real tritonserver (pytriton's build, python backend).

Checks what the classifier service relies on: Triton returns the same probabilities
as the exported model in process, and loading a new version while requests stream
in fails none of them, each answer coming from the version that was asked for.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from bmcell import modelrepo, tls, triton
from bmcell.network import CellClassifier, WithSoftmax
from bmcell.preprocess import batch_from_crops
from bmcell.settings import TlsSettings
from bmcell.taxonomy import DEFAULT_TAXONOMY

pytestmark = pytest.mark.integration

MODEL = "cellclassifier"
SIZE = 64


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pids_mentioning(marker: str) -> list[int]:
    """Processes whose command line mentions ``marker`` (our temp repo): stray stubs."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def _kill_server(proc: subprocess.Popen[bytes], marker: str) -> None:
    """SIGTERM the server's process group, SIGKILL after a grace period, then any stray stub."""
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # stubs left in the group
    for pid in _pids_mentioning(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _model(seed: int) -> CellClassifier:
    torch.manual_seed(seed)
    model = CellClassifier(DEFAULT_TAXONOMY.num_classes)
    with torch.no_grad():  # random, peaked class priors so versions differ clearly
        model.head[-1].bias.normal_(0.0, 2.0)
    return model.eval()


@dataclass
class Server:
    grpc_url: str
    repo: Path
    models: dict[int, CellClassifier]
    log: Path
    tls: TlsSettings

    def client(self) -> grpcclient.InferenceServerClient:
        return triton.client(self.grpc_url, self.tls)

    def export(self, version: int, seed: int) -> None:
        model = _model(seed)
        files = modelrepo.export_version(
            model,
            DEFAULT_TAXONOMY,
            SIZE,
            model_name=MODEL,
            version=version,
            metadata={"seed": seed, "source": "test"},
        )
        modelrepo.write_tree(files, self.repo)
        self.models[version] = model


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("triton")
    repo = base / "models"
    repo.mkdir()
    log = base / "tritonserver.log"
    http_port, grpc_port, metrics_port = _free_ports(3)
    files = tls.ensure_local_ca(base / "tls", ["127.0.0.1"])  # served as the stack serves it
    encryption = TlsSettings(tls="on", tls_ca=files.ca, tls_cert=files.cert, tls_key=files.key)
    argv = triton.tritonserver_command(
        str(repo),
        http_port,
        grpc_port,
        metrics_port,
        backend_dir=triton.backend_directory(base / "backends"),
        tls=encryption,
    )
    srv = Server(grpc_url=f"127.0.0.1:{grpc_port}", repo=repo, models={}, log=log, tls=encryption)
    srv.export(1, seed=1)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv,
            env=triton.tritonserver_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group: teardown kills stubs too
        )
    try:
        try:
            triton.wait_ready(srv.grpc_url, timeout_s=60, tls=encryption)
            with srv.client() as client:
                client.load_model(MODEL)
            triton.wait_ready(srv.grpc_url, timeout_s=60, models=[MODEL], tls=encryption)
        except Exception as exc:
            raise RuntimeError(
                f"tritonserver failed to start (exit code {proc.poll()}): {exc}\n"
                f"{log.read_text(errors='replace')[-4000:]}"
            ) from exc
        yield srv
    finally:
        _kill_server(proc, str(repo))
        assert not _pids_mentioning(str(repo)), "tritonserver or a stub survived teardown"


def _crops(n: int, seed: int) -> list[bytes]:
    """PNG crops at the stored size (282), so the test goes through preprocessing."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (282, 282, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def _infer(client: grpcclient.InferenceServerClient, x: np.ndarray, version: int) -> np.ndarray:
    inp = grpcclient.InferInput("INPUT", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(
        MODEL,
        [inp],
        model_version=str(version),
        outputs=[grpcclient.InferRequestedOutput("PROB")],
        client_timeout=30,
    )
    return result.as_numpy("PROB")


def _in_process(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def test_triton_matches_in_process_model(server: Server) -> None:
    x = batch_from_crops(_crops(5, seed=7), SIZE)
    with server.client() as client:
        got = _infer(client, x, 1)
    assert got.shape == (5, DEFAULT_TAXONOMY.num_classes)
    assert got.dtype == np.float32
    scripted = torch.jit.load(str(server.repo / MODEL / "1" / "model.pt"))
    np.testing.assert_allclose(got, _in_process(scripted, x), atol=1e-5)
    np.testing.assert_allclose(got, _in_process(WithSoftmax(server.models[1]).eval(), x), atol=1e-5)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_wrong_input_size_is_refused_with_shape(server: Server) -> None:
    x = np.zeros((1, 3, SIZE + 16, SIZE + 16), dtype=np.float32)
    with (
        server.client() as client,
        pytest.raises(InferenceServerException, match=r"\(1, 3, 80, 80\)"),
    ):
        _infer(client, x, 1)


def test_loading_new_version_fails_no_inflight_request(server: Server) -> None:
    x = batch_from_crops(_crops(3, seed=11), SIZE)
    server.export(2, seed=2)
    expected = {v: _in_process(WithSoftmax(m).eval(), x) for v, m in server.models.items()}
    assert np.abs(expected[1] - expected[2]).max() > 1e-2, "versions must be distinguishable"

    active = {"version": 1}
    stop = threading.Event()
    answers: list[tuple[int, np.ndarray]] = []
    failures: list[str] = []

    def stream() -> None:
        with server.client() as client:
            while not stop.is_set():
                version = active["version"]
                try:
                    answers.append((version, _infer(client, x, version)))
                except Exception as exc:  # any failure is the finding
                    failures.append(f"version {version}: {exc}")

    worker = threading.Thread(target=stream, daemon=True)
    worker.start()
    try:
        time.sleep(0.5)
        before = len(answers)
        with server.client() as client:
            client.load_model(MODEL)  # reload: picks up version 2, keeps version 1
            assert client.is_model_ready(MODEL, "1")
            assert client.is_model_ready(MODEL, "2")
        during = len(answers) - before
        active["version"] = 2  # the activation switch
        time.sleep(1.0)
    finally:
        stop.set()
        worker.join(timeout=60)
    assert not worker.is_alive()
    assert failures == []
    assert during > 0, "no request completed while version 2 was loading"
    served = {v for v, _ in answers}
    assert served == {1, 2}
    for version, got in answers:
        np.testing.assert_allclose(got, expected[version], atol=1e-5)
