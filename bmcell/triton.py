"""Run the ``tritonserver`` that the ``nvidia-pytriton`` wheel ships, as a plain process.

pytriton normally drives this binary itself; bmcell only wants the server, started
by the stack manager like any other process. Three things the wheel leaves to its
own launcher have to be done here:

* the python backend's stub (``triton_python_backend_stub``) ships per Python
  version under ``pytriton/tritonserver/python_backend_stubs/<X.Y>/`` and must sit
  in ``<backend-directory>/python/`` next to ``libtriton_python.so``; the wheel's
  ``backends/python`` has no stub, so ``backend_directory`` assembles one (symlinks);
* the stub links ``libpython3.X.so`` and the server/backends link the wheel's
  bundled libraries, so ``LD_LIBRARY_PATH`` needs the running interpreter's libdir
  first and ``nvidia_pytriton.libs`` after it;
* the stub embeds Python and must import torch/numpy from this environment, so the
  interpreter's ``bin`` goes first on ``PATH`` (the embedded interpreter finds its
  prefix and ``pyvenv.cfg`` from ``python3`` on ``PATH``) and ``PYTHONPATH`` names
  this environment's site-packages as a belt-and-braces.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytriton

from bmcell import tls as bmcell_tls
from bmcell.errors import ConfigError
from bmcell.settings import TlsSettings

_PYTRITON_DIR = Path(pytriton.__file__).resolve().parent
TRITON_DIST_DIR = _PYTRITON_DIR / "tritonserver"
TRITON_LIBS_DIR = _PYTRITON_DIR.parent / "nvidia_pytriton.libs"
_PY_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


def tritonserver_binary() -> Path:
    """Path of the wheel's ``tritonserver`` executable."""
    path = TRITON_DIST_DIR / "bin" / "tritonserver"
    if not path.is_file():
        raise FileNotFoundError(
            f"tritonserver binary not found at {path} (is nvidia-pytriton installed?)"
        )
    return path


def python_libdir() -> Path:
    """Directory holding the running interpreter's ``libpython3.X.so`` (the stub links it)."""
    libdir = Path(sysconfig.get_config_var("LIBDIR") or Path(sys.base_prefix) / "lib")
    ldlib = sysconfig.get_config_var("LDLIBRARY") or f"libpython{_PY_VERSION}.so"
    if not (libdir / ldlib).exists():
        raise FileNotFoundError(
            f"{ldlib} not found in {libdir}: the python backend stub needs a shared libpython "
            f"(build Python with --enable-shared)"
        )
    return libdir


def _default_backend_root() -> Path:
    # Inside the environment whose pytriton the links point at: a folder shared by
    # several virtualenvs (a user cache) is relinked by each and left dangling when one
    # of them is deleted, under a Triton another still runs.
    return Path(sys.prefix) / "share" / "bmcell" / f"triton-backends-pytriton{pytriton.__version__}"


def backend_directory(root: str | os.PathLike[str] | None = None) -> Path:
    """Assemble (idempotently) and return a ``--backend-directory`` with a complete python backend.

    ``<root>/python/`` gets symlinks to the wheel's ``libtriton_python.so`` and
    ``triton_python_backend_utils.py`` plus the stub built for the running Python.
    Default root: ``<sys.prefix>/share/bmcell/triton-backends-pytriton<version>``.
    """
    base = Path(root) if root is not None else _default_backend_root()
    src_python = TRITON_DIST_DIR / "backends" / "python"
    stub = TRITON_DIST_DIR / "python_backend_stubs" / _PY_VERSION / "triton_python_backend_stub"
    if not stub.is_file():
        raise FileNotFoundError(
            f"pytriton ships no python backend stub for Python {_PY_VERSION} ({stub})"
        )
    wanted = {
        "libtriton_python.so": src_python / "libtriton_python.so",
        "triton_python_backend_utils.py": src_python / "triton_python_backend_utils.py",
        "triton_python_backend_stub": stub,
    }
    dst = base / "python"
    dst.mkdir(parents=True, exist_ok=True)
    for name, src in wanted.items():
        link = dst / name
        if link.is_symlink() and link.resolve() == src.resolve():
            continue
        tmp = dst / f".{name}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(src)
        tmp.replace(link)  # atomic: concurrent callers never see a missing file
    return base


def _prepend(path_var: str | None, *entries: str) -> str:
    parts = [e for e in entries if e]
    if path_var:
        parts += [p for p in path_var.split(os.pathsep) if p and p not in parts]
    return os.pathsep.join(parts)


def tritonserver_env(base_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for ``tritonserver`` so its python backend stub runs in this venv.

    ``base_env`` defaults to ``os.environ``; cloud credentials (``AWS_*``) in it pass
    through unchanged.
    """
    env = dict(os.environ if base_env is None else base_env)
    env["LD_LIBRARY_PATH"] = _prepend(
        env.get("LD_LIBRARY_PATH"), str(python_libdir()), str(TRITON_LIBS_DIR)
    )
    env["PATH"] = _prepend(env.get("PATH"), str(Path(sys.executable).parent))
    site_dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    env["PYTHONPATH"] = _prepend(env.get("PYTHONPATH"), *dict.fromkeys(site_dirs))
    return env


def tritonserver_command(
    repo: str,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    model_control: str = "explicit",
    *,
    address: str = "127.0.0.1",
    backend_dir: str | os.PathLike[str] | None = None,
    load_models: Sequence[str] = (),
    shm_prefix: str | None = None,
    log_verbose: int = 0,
    extra_args: Sequence[str] = (),
    tls: TlsSettings | None = None,
) -> list[str]:
    """argv for the wheel's ``tritonserver`` serving ``repo`` (a path or ``s3://...`` URL).

    ``model_control``: ``explicit`` (bmcell's default: the trainer/publisher calls
    ``load_model``), ``poll`` or ``none``. ``shm_prefix`` names the python backend's
    shared-memory regions; it defaults to one derived from the gRPC port so that two
    servers on one host (tests, several stacks) never collide in ``/dev/shm``.
    With ``tls`` on, the gRPC endpoint presents its certificate and the HTTP endpoint,
    which Triton cannot encrypt and bmcell does not use, stays closed; metrics stay
    plain HTTP like every service's.
    """
    if model_control not in ("explicit", "poll", "none"):
        raise ValueError(f"model_control must be explicit, poll or none, got {model_control!r}")
    ports = {"http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port}
    for what, port in ports.items():
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"{what} must be a TCP port 1..65535, got {port!r}")
    if len(set(ports.values())) != 3:
        raise ValueError(f"http, grpc and metrics ports must differ, got {ports}")
    if not repo:
        raise ValueError("repo (model repository path or URL) is empty")
    encrypted = tls is not None and tls.tls == "on"
    backends = Path(backend_dir) if backend_dir is not None else backend_directory()
    prefix = shm_prefix or f"bmcell_triton_{grpc_port}_"
    argv = [
        str(tritonserver_binary()),
        f"--model-repository={repo}",
        f"--model-control-mode={model_control}",
        f"--backend-directory={backends}",
        f"--backend-config=python,shm-region-prefix-name={prefix}",
        f"--allow-http={'false' if encrypted else 'true'}",
        f"--http-address={address}",
        f"--http-port={http_port}",
        "--allow-grpc=true",
        f"--grpc-address={address}",
        f"--grpc-port={grpc_port}",
        *_grpc_tls_args(tls),
        "--allow-metrics=true",
        "--allow-gpu-metrics=false",
        f"--metrics-address={address}",
        f"--metrics-port={metrics_port}",
        "--strict-readiness=true",
        # CPU-only: the wheel's CUDA runtime finds no driver; skip the pinned pool.
        "--pinned-memory-pool-byte-size=0",
        "--exit-on-error=true",
        f"--log-verbose={log_verbose}",
    ]
    if model_control == "poll":
        argv.append("--repository-poll-secs=5")
    argv += [f"--load-model={name}" for name in load_models]
    argv += list(extra_args)
    return argv


def _grpc_tls_args(tls: TlsSettings | None) -> list[str]:
    if tls is None or tls.tls == "off":
        return []
    missing = [f for f in ("tls_ca", "tls_cert", "tls_key") if getattr(tls, f) is None]
    if missing:
        raise ConfigError(f"BMCELL_{missing[0].upper()} is required when BMCELL_TLS=on (Triton)")
    return [
        "--grpc-use-ssl=true",
        f"--grpc-server-cert={tls.tls_cert}",
        f"--grpc-server-key={tls.tls_key}",
        f"--grpc-root-cert={tls.tls_ca}",
    ]


def client(grpc_url: str, tls: TlsSettings | None = None, **kwargs: Any):
    """A ``tritonclient.grpc`` client that verifies Triton against BMCELL_TLS_CA."""
    import tritonclient.grpc as grpcclient

    tls = tls or bmcell_tls.settings()
    if tls.tls == "on":
        kwargs.update(ssl=True, root_certificates=str(bmcell_tls.ca_file(tls)))
    return grpcclient.InferenceServerClient(url=grpc_url, **kwargs)


def wait_ready(
    grpc_url: str,
    timeout_s: float = 60.0,
    *,
    models: Sequence[str] = (),
    tls: TlsSettings | None = None,
) -> None:
    """Block until the server at ``grpc_url`` (``host:port``) is live and ready.

    With ``models``, also wait for each to be ready. Raises ``TimeoutError`` naming
    the URL and the last error seen, so a failed start says why.
    """
    from tritonclient.utils import InferenceServerException

    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    server = client(grpc_url, tls)
    try:
        while True:
            try:
                if server.is_server_live() and server.is_server_ready():
                    pending = [m for m in models if not server.is_model_ready(m)]
                    if not pending:
                        return
                    last = f"models not ready: {pending}"
                else:
                    last = "server not live/ready"
            except InferenceServerException as exc:
                last = str(exc)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"Triton at {grpc_url} not ready after {timeout_s}s: {last}")
            time.sleep(0.2)
    finally:
        server.close()
