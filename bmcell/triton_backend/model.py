"""Triton python-backend model: serve the TorchScript ``model.pt`` beside this file.

Generic on purpose: every bmcell model version ships this same file next to its
``model.pt``, so any Triton with the python backend and torch in its image (the
local pytriton build, or stock Triton in production) serves the repository as is.
It depends on torch, numpy and Triton's ``triton_python_backend_utils`` only; bmcell
itself is not importable inside the backend stub.

Contract (see ``config.pbtxt``): input ``INPUT`` FP32 (N, 3, S, S) in [0, 1], S the
``input_size`` recorded in ``preprocessing.json``; output ``PROB`` FP32 (N, C),
softmax probabilities in the order of ``taxonomy.json``. Runs on CPU under
``torch.inference_mode``.

Speed (measured on 2 shared cores, docs/scaling.md): each instance runs one torch
intra-op thread (``torch_num_threads``; parallelism comes from ``instance_count``
instances, two threads per process contended and ran slower), the loaded TorchScript
is frozen (batch norm folded into the convolutions) and fed channels-last, which
ran the 64 px classifier about 1.5-2x faster than the plain scripted module. Both are
done here at load time, so versions exported before this file changed gain them too
once served by it; a module that cannot be frozen is served as it is.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """One instance per (version, instance_group entry); Triton calls ``execute`` with batches."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        # Version directory: where Triton (after any cloud download) put this file.
        here = os.path.dirname(os.path.abspath(__file__))
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        threads = int(params.get("torch_num_threads", "0") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        with open(os.path.join(here, "preprocessing.json")) as f:
            self.input_size = int(json.load(f)["input_size"])
        with open(os.path.join(here, "taxonomy.json")) as f:
            self.num_classes = len(json.load(f)["classes"])
        self.model = _frozen(torch.jit.load(os.path.join(here, "model.pt"), map_location="cpu"))
        self.label = f"{args.get('model_name', '?')} version {args.get('model_version', '?')}"
        # TorchScript's profiling executor optimises a graph on its first calls: make
        # them here, so no client's request pays for them.
        with torch.inference_mode():
            for n in (1, 2, 8, 1, 8):
                self._forward(np.zeros((n, 3, self.input_size, self.input_size), np.float32))

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)
        return self.model(x).to(torch.float32).numpy()

    def _check(self, array: np.ndarray) -> str | None:
        s = self.input_size
        if array.ndim != 4 or array.shape[1:] != (3, s, s):
            return (
                f"{self.label}: {self.input_name} must have shape (N, 3, {s}, {s}), "
                f"got {tuple(array.shape)}"
            )
        return None

    def execute(self, requests: list[Any]) -> list[Any]:
        """Run every well-formed request of the batch in one forward pass, then split."""
        responses: list[Any] = [None] * len(requests)
        arrays: list[np.ndarray] = []
        owners: list[int] = []
        for i, request in enumerate(requests):
            array = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            problem = self._check(array)
            if problem is not None:
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(problem)
                )
                continue
            arrays.append(array)
            owners.append(i)
        if arrays:
            batch = np.concatenate(arrays, axis=0).astype(np.float32, copy=False)
            with torch.inference_mode():
                prob = self._forward(batch)
            if prob.shape != (batch.shape[0], self.num_classes):
                raise pb_utils.TritonModelException(
                    f"{self.label}: model returned shape {prob.shape}, "
                    f"expected ({batch.shape[0]}, {self.num_classes})"
                )
            start = 0
            for array, i in zip(arrays, owners, strict=True):
                part = np.ascontiguousarray(prob[start : start + array.shape[0]])
                start += array.shape[0]
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(self.output_name, part)]
                )
        return responses

    def finalize(self) -> None:
        self.model = None


def _frozen(module: Any) -> Any:
    """``module`` in eval mode, frozen when TorchScript can freeze it."""
    module.eval()
    try:
        return torch.jit.freeze(module)
    except Exception:  # an exotic module (or an already frozen one) is served unfrozen
        return module
