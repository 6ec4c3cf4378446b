"""A specimen's differential count over HTTP: predict on demand, read, sign off.

``register(app, runtime, caller)`` adds three routes (each in bmcell.policy):

- ``POST /v1/specimens/{lab}/{specimen}/predict`` streams NDJSON progress while the
  classifier predicts the specimen's cells that have neither a reviewer's label nor
  a prediction of the active version (one line per classifier progress message,
  then ``{"finished": true, ...}``); a client shows it, then reads the report.
- ``GET /v1/specimens/{lab}/{specimen}/report`` predicts whatever is still missing
  (without progress) and answers JSON or a self-contained HTML page that prints on
  A4 (``?format=json|html``, else the Accept header), the same numbers in both.
- ``POST /v1/specimens/{lab}/{specimen}/report/verify`` signs the count off as the
  caller (reviewer or admin), audited; the report then says "verified by".

The labeling API calls the classifier's ``PredictPool`` as its own service account
(``BMCELL_SERVICE_TOKEN``) over TLS (bmcell.tls), with a deadline that grows with
the number of cells. Before any model passed the gate the routes answer 409.
A specimen outside the caller's labs answers 404, as if it did not exist.
"""

# No ``from __future__ import annotations``: the routes' ``Caller`` is a local
# (app.py's dependency, passed in), which FastAPI must see evaluated, not as a string.
import json
from collections.abc import Callable, Iterator
from datetime import UTC
from functools import cached_property
from typing import Annotated, Any, Literal

import grpc
from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from bmcell import grpc_client, log
from bmcell import report as rep
from bmcell.auth import Principal, lab_ids_for_codes
from bmcell.errors import BmcellError, Unavailable
from bmcell.runtime import Runtime
from bmcell.settings import LabelApiSettings
from bmcell.v1 import classifier_pb2, classifier_pb2_grpc

_LOG = log.get(__name__)


class VerifyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    digest: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="the report's digest as the signer read it; refused if it changed since",
    )


class Predictor:
    """The classifier's PredictPool, called as the labeling API's service account."""

    def __init__(self, settings: LabelApiSettings) -> None:
        self.settings = settings

    @cached_property
    def stub(self) -> classifier_pb2_grpc.ClassifierStub:
        if not self.settings.classifier_addr:
            raise Unavailable(
                "this labeling API has no classifier (BMCELL_CLASSIFIER_ADDR is not set), "
                "so it cannot predict the specimen's cells"
            )
        token = self.settings.service_token
        channel = grpc_client.channel(
            self.settings.classifier_addr,
            default_timeout_s=self.settings.outbound_timeout_s,
            token=token.get_secret_value() if token else None,
        )
        return classifier_pb2_grpc.ClassifierStub(channel)

    def deadline_s(self, n_cells: int) -> float:
        # In proportion to the cells, as the selector's (BMCELL_PREDICT_CELLS_PER_S).
        return self.settings.prediction_deadline_s(n_cells)

    def predict(self, cell_ids: list[int], version: int) -> Iterator[dict]:
        """Progress dicts (done, total, written) until the classifier has stored a
        prediction of ``version`` for every cell; Unavailable when it fails."""
        request = classifier_pb2.PredictPoolRequest(cell_ids=cell_ids, model_version=version)
        try:
            for p in self.stub.PredictPool(request, timeout=self.deadline_s(len(cell_ids))):
                yield {"done": p.done, "total": p.total, "written": p.written}
        except grpc.RpcError as exc:
            code = exc.code().name if exc.code() is not None else "UNKNOWN"
            raise Unavailable(
                f"the classifier failed to predict the specimen's cells ({code})",
                detail=f"{self.settings.classifier_addr}: {exc.details()}",
            ) from exc


def _wants_html(request: Request, format: str | None) -> bool:
    if format is not None:
        return format == "html"
    accept = request.headers.get("accept", "")
    return "text/html" in accept and "application/json" not in accept


def register(
    app: FastAPI,
    runtime: Runtime[LabelApiSettings],
    caller: Any,
) -> None:
    """Add the report routes to ``app``; ``caller`` is the app's authorized-caller
    dependency type (``Annotated[Principal, Depends(...)]``)."""
    settings = runtime.settings
    db = runtime.db
    predictor = Predictor(settings)
    Caller = caller  # noqa: N806 - a type alias, as in app.py

    def missing(principal: Principal, lab: str, specimen: str) -> tuple[dict, dict, list[int]]:
        """The specimen (404 outside the caller's labs), the active model ({} when
        none) and the cells it must predict."""
        lab_ids_for_codes(db, principal, [lab])  # 404 outside the caller's labs
        with db.connection() as conn:
            spec = rep.find_specimen(conn, specimen, lab, visible=principal.sees_lab)
            model = rep.active_model(conn, settings.model_name)
            if model is None:
                return spec, {}, []
            cells = rep.unpredicted_cells(conn, spec["id"], settings.model_name, model["version"])
        return spec, model, cells

    def predict_all(cells: list[int], model: dict) -> None:
        for _ in predictor.predict(cells, model["version"]):
            pass

    def build(
        principal: Principal, lab: str, specimen: str, min_confidence: float
    ) -> dict[str, Any]:
        _spec, model, cells = missing(principal, lab, specimen)
        if cells:
            predict_all(cells, model)
        with db.connection() as conn:
            return rep.specimen_report(
                conn,
                specimen,
                lab=lab,
                model_name=settings.model_name,
                min_confidence=min_confidence,
                visible=principal.sees_lab,
            )

    @app.post(
        "/v1/specimens/{lab}/{specimen}/predict",
        summary="Predict the specimen's unclassified cells, streaming NDJSON progress",
        responses={200: {"content": {"application/x-ndjson": {}}}},
    )
    def predict_specimen(lab: str, specimen: str, caller: Caller) -> Response:
        spec, model, cells = missing(caller, lab, specimen)
        if not model:
            with db.connection() as conn:
                rep.require_model(conn, settings.model_name)
        head = {
            "lab": spec["lab"],
            "specimen": spec["code"],
            "model_version": model["version"],
            "to_predict": len(cells),
        }

        def lines() -> Iterator[str]:
            yield json.dumps(head) + "\n"
            try:
                for progress in predictor.predict(cells, model["version"]) if cells else ():
                    yield json.dumps(progress) + "\n"
            except BmcellError as exc:  # the status line has gone: the error is a line
                _LOG.warning("report prediction failed", message=exc.message, detail=exc.detail)
                yield json.dumps({"finished": False, "error": exc.message}) + "\n"
                return
            yield json.dumps({"finished": True, "predicted": len(cells)}) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.get(
        "/v1/specimens/{lab}/{specimen}/report",
        summary="A specimen's differential count (JSON, or an HTML page that prints on A4)",
        responses={200: {"content": {"application/json": {}, "text/html": {}}}},
    )
    def specimen_report(
        lab: str,
        specimen: str,
        request: Request,
        caller: Caller,
        format: Literal["json", "html"] | None = None,
        min_confidence: Annotated[float, Query(ge=0, le=1)] = rep.DEFAULT_MIN_CONFIDENCE,
        per_class: Annotated[int, Query(ge=0, le=100)] = rep.DEFAULT_PER_CLASS,
    ) -> Response:
        body = build(caller, lab, specimen, min_confidence)
        if not _wants_html(request, format):
            return JSONResponse(rep.public(body))
        fetch: Callable[[str], bytes] = runtime.store.get
        thumbs = rep.thumbnails(body, fetch, per_class) if per_class else {}
        return HTMLResponse(rep.render_html(body, thumbs, per_class=per_class))

    @app.post(
        "/v1/specimens/{lab}/{specimen}/report/verify",
        status_code=201,
        summary="Sign the specimen's differential count off (reviewer or admin; audited)",
    )
    def verify_report(
        lab: str, specimen: str, caller: Caller, body: VerifyIn | None = None
    ) -> dict:
        report = build(caller, lab, specimen, rep.DEFAULT_MIN_CONFIDENCE)
        with db.transaction() as conn:
            row = rep.record_verification(
                conn, report, user_id=caller.user_id, seen_digest=body.digest if body else None
            )
        return {
            "lab": report["lab"],
            "specimen": report["specimen"],
            "verified_by": caller.name,
            "verified_at": row["verified_at"].astimezone(UTC).isoformat(timespec="seconds"),
            "digest": report["digest"],
            "model_version": report["model"]["version"] if report["model"] else None,
        }
