"""Lay out a classifier version in the Triton model-repository format, as bytes.

A model version is ``<model_name>/<version>/`` holding the TorchScript of the served
form (``WithSoftmax``), the generic python-backend ``model.py`` that serves it, and
what is needed to use it correctly: the taxonomy (class order of the output) and
the preprocessing (input size, channel order, scaling). ``<model_name>/config.pbtxt``
is shared by all versions. The functions here do no storage I/O: callers upload the
returned ``{relative path: bytes}`` to object storage, or ``write_tree`` them to a
local directory, so the same export feeds S3 (SeaweedFS, MinIO) and a temp directory in tests.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import re
import threading
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bmcell.network import WithSoftmax
from bmcell.preprocess import preprocessing_spec
from bmcell.taxonomy import Taxonomy

INPUT_NAME = "INPUT"
OUTPUT_NAME = "PROB"
DEFAULT_MAX_BATCH_SIZE = 64
# One torch thread per backend instance, two instances: on 2 shared cores two
# single-threaded processes ran the classifier faster than one process with two
# threads, and a single-cell request need not wait behind a pool batch (docs/scaling.md).
DEFAULT_INSTANCE_COUNT = 2
DEFAULT_TORCH_THREADS = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# torch.jit.script is not thread-safe while it compiles a module type for the first
# time ("Can't redefine method: forward"): two publishes in one process take turns.
_SCRIPTING = threading.Lock()


def backend_model_py() -> bytes:
    """The python-backend ``model.py`` shipped with every version (package data)."""
    return resources.files("bmcell.triton_backend").joinpath("model.py").read_bytes()


def _check_name(model_name: str) -> None:
    if not isinstance(model_name, str) or not _NAME_RE.match(model_name):
        raise ValueError(
            f"model_name must match {_NAME_RE.pattern} (one path segment), got {model_name!r}"
        )


def _check_version(version: int) -> None:
    # Triton ignores version directories that are non-numeric or start with "0".
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"version must be an int >= 1 (Triton version directory), got {version!r}")


def config_pbtxt(
    model_name: str,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    *,
    versions: Sequence[int] | None = None,
    instance_count: int = DEFAULT_INSTANCE_COUNT,
    max_queue_delay_us: int = 1000,
    torch_num_threads: int = DEFAULT_TORCH_THREADS,
) -> str:
    """Triton ``config.pbtxt`` for the python backend serving a bmcell classifier.

    ``versions=None`` writes ``version_policy: { all {} }``: every version directory in
    the repository is loaded, so loading a new version never unloads the one in use
    and clients (which always name ``model_version``) see no failed request during an
    activation switch. Passing explicit versions writes ``specific`` instead, which is
    how a publisher bounds memory (each loaded version is one backend stub process).
    ``torch_num_threads`` > 0 caps intra-op threads per instance (0: torch default).
    """
    _check_name(model_name)
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
    if instance_count < 1:
        raise ValueError(f"instance_count must be >= 1, got {instance_count}")
    if max_queue_delay_us < 0:
        raise ValueError(f"max_queue_delay_us must be >= 0, got {max_queue_delay_us}")
    if torch_num_threads < 0:
        raise ValueError(f"torch_num_threads must be >= 0, got {torch_num_threads}")
    policy = "version_policy: { all { } }" if versions is None else _specific(versions)
    return f"""\
name: "{model_name}"
backend: "python"
max_batch_size: {max_batch_size}
{policy}
input [
  {{
    name: "{INPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ 3, -1, -1 ]
  }}
]
output [
  {{
    name: "{OUTPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ -1 ]
  }}
]
instance_group [
  {{
    count: {instance_count}
    kind: KIND_CPU
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {max_queue_delay_us}
}}
parameters: {{
  key: "torch_num_threads"
  value: {{ string_value: "{torch_num_threads}" }}
}}
"""


def _specific(versions: Sequence[int]) -> str:
    if not versions:
        raise ValueError("versions must name at least one version, or be None for all")
    for v in versions:
        _check_version(v)
    listed = ", ".join(str(v) for v in sorted(set(versions)))
    return f"version_policy: {{ specific {{ versions: [ {listed} ] }} }}"


_POLICY_LINE = re.compile(r"^version_policy:.*$", re.MULTILINE)


def with_versions(config: str, versions: Sequence[int]) -> str:
    """``config`` (a ``config.pbtxt`` as :func:`config_pbtxt` writes it) loading only
    ``versions``: its ``version_policy`` line replaced (or added) by ``specific``."""
    policy = _specific(versions)
    if _POLICY_LINE.search(config):
        return _POLICY_LINE.sub(policy, config, count=1)
    return config.rstrip("\n") + "\n" + policy + "\n"


def script_served_model(model: nn.Module) -> torch.jit.ScriptModule:
    """TorchScript of the served form (softmax appended), on CPU in eval mode.

    Works on a deep copy so the caller's model keeps its device and train/eval mode.
    """
    served = copy.deepcopy(model).to("cpu")
    if not isinstance(served, WithSoftmax):
        served = WithSoftmax(served)
    served.eval()
    with _SCRIPTING:
        return torch.jit.script(served)


def torchscript_bytes(scripted: torch.jit.ScriptModule) -> bytes:
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    return buf.getvalue()


def _json_bytes(data: Any, what: str) -> bytes:
    try:
        return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
    except TypeError as exc:
        raise ValueError(f"{what} is not JSON-serialisable: {exc}") from exc


def export_version(
    model: nn.Module,
    taxonomy: Taxonomy,
    input_size: int,
    *,
    model_name: str,
    version: int,
    metadata: Mapping[str, Any],
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    versions: Sequence[int] | None = None,
    instance_count: int = DEFAULT_INSTANCE_COUNT,
    torch_num_threads: int = DEFAULT_TORCH_THREADS,
) -> dict[str, bytes]:
    """Export ``model`` (logits, or already ``WithSoftmax``) as one Triton model version.

    Returns ``{relative path: bytes}``: ``<model_name>/config.pbtxt`` and, under
    ``<model_name>/<version>/``, ``model.pt``, ``model.py``, ``taxonomy.json``,
    ``preprocessing.json`` and ``metadata.json`` (the caller's metadata plus the
    model's sha256 and shapes). A forward pass on zeros checks that the output width
    equals the taxonomy's class count before anything is returned, so a model trained
    for another taxonomy cannot be published under this one.
    """
    _check_name(model_name)
    _check_version(version)
    spec = preprocessing_spec(input_size)
    scripted = script_served_model(model)
    with torch.inference_mode():
        out = scripted(torch.zeros(2, 3, input_size, input_size))
    if tuple(out.shape) != (2, taxonomy.num_classes):
        raise ValueError(
            f"model outputs shape {tuple(out.shape)} for a batch of 2, but taxonomy "
            f"{taxonomy.name!r} has {taxonomy.num_classes} classes"
        )
    model_pt = torchscript_bytes(scripted)
    meta = dict(metadata)
    meta.update(
        {
            "model_name": model_name,
            "version": version,
            "input_size": input_size,
            "num_classes": taxonomy.num_classes,
            "taxonomy": taxonomy.name,
            "model_pt_sha256": hashlib.sha256(model_pt).hexdigest(),
            "torch_version": torch.__version__,
            "inputs": {INPUT_NAME: ["N", 3, input_size, input_size]},
            "outputs": {OUTPUT_NAME: ["N", taxonomy.num_classes]},
        }
    )
    vdir = f"{model_name}/{version}"
    return {
        f"{model_name}/config.pbtxt": config_pbtxt(
            model_name,
            max_batch_size,
            versions=versions,
            instance_count=instance_count,
            torch_num_threads=torch_num_threads,
        ).encode(),
        f"{vdir}/model.pt": model_pt,
        f"{vdir}/model.py": backend_model_py(),
        f"{vdir}/taxonomy.json": _json_bytes(taxonomy.to_json(), "taxonomy"),
        f"{vdir}/preprocessing.json": _json_bytes(spec, "preprocessing spec"),
        f"{vdir}/metadata.json": _json_bytes(meta, "metadata"),
    }


def write_tree(files: Mapping[str, bytes], root_dir: str | Path) -> list[Path]:
    """Write ``{relative path: bytes}`` under ``root_dir``; returns the paths (re)written.

    Version files are written before ``config.pbtxt`` and each file atomically
    (temp file + rename), so a Triton polling or loading the directory never sees a
    half-written ``model.pt``. Paths escaping ``root_dir`` are refused.
    """
    root = Path(root_dir).resolve()
    ordered = sorted(files, key=lambda p: (p.endswith("config.pbtxt"), p))
    written: list[Path] = []
    for rel in ordered:
        target = (root / rel).resolve()
        if rel.startswith("/") or not target.is_relative_to(root):
            raise ValueError(f"path {rel!r} escapes the repository root {root}")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_file() and target.read_bytes() == files[rel]:
            continue  # unchanged: keep its mtime, which Triton reads as "model changed"
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(files[rel])
        tmp.replace(target)
        written.append(target)
    return written
