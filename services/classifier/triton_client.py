"""Triton over gRPC with a deadline and bounded retries on every call.

Triton being down or overloaded becomes ``Unavailable`` with the URL in the message,
after ``retries`` attempts with short backoff, never a hang.
"""

from __future__ import annotations

import time

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from bmcell import log, triton
from bmcell.errors import InvalidArgument, Unavailable
from bmcell.modelrepo import INPUT_NAME, OUTPUT_NAME

_LOG = log.get(__name__)
_RETRYABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "INTERNAL")


class Triton:
    def __init__(self, url: str, timeout_s: float, retries: int, cells_per_s: float = 50.0) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.cells_per_s = cells_per_s
        self.retries = retries
        self.client = triton.client(url)

    def _call(self, what: str, fn, *args, **kwargs):
        delay = 0.1
        for attempt in range(self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except InferenceServerException as exc:
                status = (exc.status() or "").upper()
                retryable = (
                    any(code in status for code in _RETRYABLE) or "unavailable" in str(exc).lower()
                )
                if not retryable or attempt == self.retries:
                    if "not found" in str(exc).lower() or "unknown model" in str(exc).lower():
                        raise ModelNotLoaded(str(exc)) from exc
                    if "shape" in str(exc).lower() or "INVALID_ARG" in status:
                        raise InvalidArgument(
                            "the model server refused the input's shape",
                            field="images",
                            detail=str(exc),
                        ) from exc
                    raise Unavailable(
                        f"the model server failed {what} after {attempt + 1} attempts",
                        detail=f"Triton at {self.url}: {exc}",
                    ) from exc
                _LOG.warning(
                    "triton call failed, retrying", what=what, attempt=attempt, error=str(exc)
                )
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    def infer(self, model_name: str, version: int, batch: np.ndarray) -> np.ndarray:
        inp = grpcclient.InferInput(INPUT_NAME, list(batch.shape), "FP32")
        inp.set_data_from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        out = grpcclient.InferRequestedOutput(OUTPUT_NAME)
        result = self._call(
            "inference",
            self.client.infer,
            model_name,
            [inp],
            model_version=str(version),
            outputs=[out],
            # A batch's deadline follows its size (BMCELL_PREDICT_CELLS_PER_S).
            client_timeout=self.timeout_s + len(batch) / self.cells_per_s,
        )
        return result.as_numpy(OUTPUT_NAME)

    def load(self, model_name: str, timeout_s: float = 120.0) -> None:
        self._call("load_model", self.client.load_model, model_name, client_timeout=timeout_s)

    def version_ready(self, model_name: str, version: int) -> bool:
        try:
            return bool(
                self.client.is_model_ready(model_name, str(version), client_timeout=self.timeout_s)
            )
        except InferenceServerException:
            return False

    def close(self) -> None:
        self.client.close()


class ModelNotLoaded(Unavailable):
    """Triton does not serve the requested model version (yet)."""
