"""HTTP surface of the labeling API (FastAPI). OpenAPI is published at /openapi.json.

Routes only: each one authenticates, opens one transaction, calls the domain module
(``queue``, ``labels``) and shapes the answer. Every /v1 route needs
``Authorization: Bearer <token>`` (401 without a valid one) and a role that
:mod:`bmcell.policy` lists for the route (403 otherwise), checked by the ``Caller``
dependency before the route runs; objects outside the caller's labs answer 404.
The reviewer page is static and served at ``/``; crops are streamed by
``GET /v1/cells/{id}/image`` after the same checks, so object storage never has to
be reachable from a reviewer's browser.
"""

from __future__ import annotations

import mimetypes
import re
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal
from uuid import UUID

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    StreamingResponse,
)
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from bmcell import audit, images, log, policy, specimens, users
from bmcell import metrics as shared_metrics
from bmcell.auth import ROLES, Principal, acting_as, authenticate, lab_ids_for_codes
from bmcell.errors import (
    BmcellError,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
    request_id,
)
from bmcell.runtime import Runtime
from bmcell.settings import LabelApiSettings
from bmcell.taxonomy import DEFAULT_TAXONOMY
from services.labelapi import exports, field_context, imports, labels, metrics, queue, reports
from services.labelapi.limits import BodyLimit

STATIC = Path(__file__).parent / "static"
# Tasks one page of the reviewer's gallery may lease at once.
MAX_PAGE = 48
_LOG = log.get(__name__)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_bearer = HTTPBearer(auto_error=False, description="a token from `bmcell users token NAME`")


class SubmitIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lease_token: UUID
    answer: Literal["confirm", "correct", "difficult"]
    class_code: str | None = Field(None, max_length=32)


class ReleaseIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lease_token: UUID


class LabelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    class_code: str = Field(max_length=32)
    note: str = Field("", max_length=500)


class BootstrapIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["initial", "validation", "test"]
    cell_ids: list[int] = Field(min_length=1, max_length=10_000)
    required_reviews: int | None = Field(None, ge=1, le=9)
    round_id: int | None = None


class LabIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str = Field(max_length=63)
    name: str = Field("", max_length=specimens.MAX_NAME)


class SpecimenRoleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str = Field(max_length=32, description="training, test or excluded")
    force: bool = False


class UserIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=100)
    role: str = Field(max_length=32, description=", ".join(ROLES))
    labs: list[str] = Field(default_factory=list, max_length=100)


class UserChangeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str | None = Field(None, max_length=32)
    labs: list[str] | None = Field(None, max_length=100)
    disabled: bool | None = None


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    expires_days: float | None = Field(None, gt=0, le=3650)


def _authorized(request: Request, creds: HTTPAuthorizationCredentials | None) -> Principal:
    if creds is None:
        raise Unauthenticated(
            "missing or malformed Authorization header; send 'Authorization: Bearer <token>'"
        )
    principal = authenticate(request.app.state.rt.db, creds.credentials)
    template = getattr(request.scope.get("route"), "path", request.url.path)
    policy.authorize(
        principal, policy.http_rule(request.method, template), f"{request.method} {template}"
    )
    return principal


async def authorized_caller(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> AsyncIterator[Principal]:
    """The caller, if their token is good and their role may call this route. Async, so
    the principal is set in the request's own context, which the (threaded) route
    inherits: what it records names the caller (bmcell.auth.current_principal)."""
    principal = await run_in_threadpool(_authorized, request, creds)
    with acting_as(principal):
        yield principal


Caller = Annotated[Principal, Depends(authorized_caller)]


def _label_source(kind: str, answer: str, outcome: str) -> str:
    """The ``source`` value of ``bmcell_labels_recorded_total`` for a finished task."""
    if outcome == "difficult":
        return "too_difficult"
    if kind == "cst":
        return "cst_confirmed" if answer == "confirm" else "cst_corrected"
    return kind


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


# The segmenter's morphometrics, named for a reader and with their units ("px²" areas
# become µm² on the page when the field's scale is known).
MORPHOMETRICS = {
    "cell_area": ("Cell area", "px²"),
    "nucleus_area": ("Nucleus area", "px²"),
    "nucleus_cell_ratio": ("Nucleus : cell area", "ratio"),
    "nucleus_axis_ratio": ("Nucleus long : short axis", "ratio"),
    "nucleus_width_ratio": ("Nucleus narrowest : widest width", "ratio"),
}


def task_json(task: dict, principal: Principal) -> dict:
    holds = task["state"] == "leased" and task["lease_owner"] == principal.user_id
    return {
        "task_id": task["id"],
        "kind": task["kind"],
        "state": task["state"],
        "round": None
        if task["round_id"] is None
        else {
            "id": task["round_id"],
            "number": task["round_number"],
            "experiment": task["experiment"],
        },
        "required_reviews": task["required_reviews"],
        "reviews_so_far": task["reviews_so_far"],
        "suggested_class": task["suggested_class"],
        "top": [
            {"class_code": c, "probability": p}
            for c, p in zip(task["top_classes"], task["top_probabilities"], strict=False)
        ],
        "cell": {
            "id": task["cell_id"],
            "lab": task["lab"],
            "specimen": task["specimen"],
            "field_id": task["field_id"],
            "index_in_field": task["index_in_field"],
            "bbox": [task["x0"], task["y0"], task["x1"], task["y1"]],
            "morphometrics": {k: task[k] for k in MORPHOMETRICS},
            "morphometrics_named": [
                {"key": k, "name": name, "unit": unit, "value": task[k]}
                for k, (name, unit) in MORPHOMETRICS.items()
            ],
            "um_per_px": task["um_per_px"],
        },
        "image_url": f"/v1/cells/{task['cell_id']}/image",
        "field_url": f"/v1/cells/{task['cell_id']}/field",
        "lease_token": str(task["lease_token"]) if holds else None,
        "leased_at": _iso(task["leased_at"]) if holds else None,
        "lease_expires_at": _iso(task["lease_expires_at"]) if holds else None,
    }


def create_app(runtime: Runtime[LabelApiSettings]) -> FastAPI:
    app = FastAPI(title="bmcell labeling API", version="1", openapi_url="/openapi.json")
    app.state.rt = runtime
    settings = runtime.settings
    db = runtime.db
    taxonomy = DEFAULT_TAXONOMY

    # Refuses oversized bodies before any route (and so authentication) reads them;
    # added first, so it sits inside the request counter below and 413s are counted.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            template = getattr(route, "path", "unmatched")
            shared_metrics.HTTP_REQUESTS.labels(template, request.method, str(status)).inc()
            shared_metrics.HTTP_REQUEST_SECONDS.labels(template, request.method).observe(
                time.perf_counter() - started
            )

    @app.middleware("http")
    async def tag_request_id(request: Request, call_next):
        """Audit rows of a request carry its id: the client's X-Request-ID, or a new one."""
        given = request.headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.match(given) else request_id()
        with audit.request_scope(rid):
            response = await call_next(request)
        response.headers["X-Request-ID"] = rid
        return response

    @app.exception_handler(BmcellError)
    async def bmcell_error(request: Request, exc: BmcellError) -> JSONResponse:
        content = {"error": exc.message, "field": exc.field}
        if exc.detail is not None:  # a driver's or a store's words: the log's, not the client's
            rid = audit.current_request_id() or request_id()
            _LOG.warning(
                "request refused",
                path=request.url.path,
                status=exc.http_status,
                request_id=rid,
                message=exc.message,
                detail=exc.detail,
            )
            content["request_id"] = rid
        # Postgres or storage down: 503 with a hint to retry, and the API recovers by
        # itself once they are back (the pool reconnects; nothing needs a restart).
        headers = {"Retry-After": "5"} if isinstance(exc, Unavailable) else None
        return JSONResponse(status_code=exc.http_status, content=content, headers=headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        rid = audit.current_request_id() or request_id()
        _LOG.error("request failed", path=request.url.path, request_id=rid, exc_info=exc)
        return JSONResponse(
            status_code=500,
            content={"error": "internal error; see the server log", "request_id": rid},
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path"))
        return JSONResponse(
            status_code=422,
            content={"error": first["msg"], "field": where or None, "detail": exc.errors()},
        )

    @app.get("/", include_in_schema=False)
    def reviewer_page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict:
        with db.connection() as conn:
            conn.execute("SELECT 1")
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    def metrics_page() -> PlainTextResponse:
        with db.connection() as conn:
            for kind, n in queue.backlog(conn).items():
                shared_metrics.REVIEW_BACKLOG_TASKS.labels(kind).set(n)
        return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/me", summary="Who the token belongs to and which labs they see")
    def me(caller: Caller) -> dict:
        with db.connection() as conn:
            rows = conn.execute(
                "SELECT code FROM labs WHERE %s OR id = ANY(%s) ORDER BY code",
                (caller.all_labs, caller.lab_list()),
            ).fetchall()
        return {"name": caller.name, "role": caller.role, "labs": [r["code"] for r in rows]}

    @app.get("/v1/taxonomy", summary="Cell classes a reviewer can choose from")
    def get_taxonomy(_caller: Caller) -> dict:
        return taxonomy.to_json()

    def lease_scope(caller: Principal, lab: str | None, suggested: str | None):
        """A lease call's filters checked: the suggested class named by the taxonomy,
        the lab one the caller sees; returns the lab ids to lease from (None: all)."""
        if suggested is not None:
            labels.check_class(taxonomy, suggested, field="suggested")
        return lab_ids_for_codes(db, caller, [lab]) if lab else None

    def count_leases(leases: list[queue.Lease]) -> None:
        for lease in leases:
            if not lease.resumed:
                metrics.TASKS_LEASED.labels(lease.task["kind"]).inc()
            if lease.took_over_expired:
                metrics.TASKS_EXPIRED.labels(lease.task["kind"]).inc()

    @app.post(
        "/v1/tasks/next",
        summary="Lease the next task (204 when the queue is empty)",
        responses={204: {"description": "no task is waiting for this caller"}},
    )
    def next_task(
        caller: Caller,
        kind: Annotated[
            Literal["cst", "al", "initial", "validation", "test", "adjudication"] | None, Query()
        ] = None,
        lab: Annotated[str | None, Query(max_length=63)] = None,
        suggested: Annotated[str | None, Query(max_length=32)] = None,
    ) -> Response:
        lab_ids = lease_scope(caller, lab, suggested)
        with db.transaction() as conn:
            lease = queue.lease_next(
                conn,
                caller,
                settings.lease_seconds,
                kind=kind,
                lab_ids=lab_ids,
                suggested=suggested,
                skip_seconds=settings.skip_seconds,
            )
        if lease is None:
            return Response(status_code=204)
        count_leases([lease])
        return JSONResponse(task_json(lease.task, caller))

    @app.post(
        "/v1/tasks/page",
        summary="Lease a page of tasks at once (a CST page shares one suggested class)",
    )
    def task_page(
        caller: Caller,
        kind: Annotated[
            Literal["cst", "al", "initial", "validation", "test", "adjudication"] | None, Query()
        ] = None,
        lab: Annotated[str | None, Query(max_length=63)] = None,
        suggested: Annotated[str | None, Query(max_length=32)] = None,
        size: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 24,
    ) -> dict:
        """Each task comes with its own lease and is answered by its own submit; a page
        whose leases ran out submits what is still held and asks again for the rest."""
        lab_ids = lease_scope(caller, lab, suggested)
        with db.transaction() as conn:
            leases = queue.lease_page(
                conn,
                caller,
                settings.lease_seconds,
                size,
                kind=kind,
                lab_ids=lab_ids,
                suggested=suggested,
                skip_seconds=settings.skip_seconds,
            )
        count_leases(leases)
        tasks = [task_json(lease.task, caller) for lease in leases]
        classes = {t["suggested_class"] for t in tasks}
        return {
            "tasks": tasks,
            "suggested_class": classes.pop() if len(classes) == 1 else None,
        }

    @app.get("/v1/tasks/{task_id}", summary="One task with its cell")
    def get_task(task_id: int, caller: Caller) -> dict:
        with db.connection() as conn:
            return task_json(queue.task_view(conn, caller, task_id), caller)

    @app.post("/v1/tasks/{task_id}/submit", summary="Answer a leased task (idempotent)")
    def submit_task(task_id: int, body: SubmitIn, caller: Caller) -> dict:
        with db.transaction() as conn:
            out = queue.submit(
                conn, caller, taxonomy, task_id, body.lease_token, body.answer, body.class_code
            )
        if not out.replayed:
            metrics.TASKS_SUBMITTED.labels(out.kind, body.answer).inc()
            if out.seconds is not None:
                metrics.REVIEW_SECONDS.labels(out.kind).observe(out.seconds)
            if out.status != "recorded":
                metrics.TASK_OUTCOMES.labels(out.kind, out.status).inc()
            if out.status in ("labelled", "difficult"):
                shared_metrics.LABELS_RECORDED.labels(
                    out.class_code or "none", _label_source(out.kind, body.answer, out.status)
                ).inc()
        return {
            "task_id": out.task_id,
            "status": out.status,
            "class_code": out.class_code,
            "reviews": out.reviews,
            "required_reviews": out.required_reviews,
            "adjudication_task_id": out.adjudication_task_id,
            "replayed": out.replayed,
        }

    @app.post("/v1/tasks/{task_id}/release", summary="Give a leased task back to the queue")
    def release_task(task_id: int, body: ReleaseIn, caller: Caller) -> dict:
        with db.transaction() as conn:
            queue.release(conn, caller, task_id, body.lease_token)
        return {"task_id": task_id, "state": "open"}

    @app.post(
        "/v1/tasks",
        status_code=201,
        summary="Create initial, validation or test labelling tasks (k reviews each)",
    )
    def create_tasks(body: BootstrapIn, caller: Caller) -> dict:
        with db.transaction() as conn:
            return queue.create_bootstrap_tasks(
                conn,
                caller,
                kind=body.kind,
                cell_ids=body.cell_ids,
                required_reviews=body.required_reviews or settings.required_reviews,
                round_id=body.round_id,
            )

    def _cell(conn, caller: Principal, cell_id: int) -> dict:
        row = conn.execute(
            """SELECT c.*, lab.code AS lab, s.code AS specimen, s.is_test
                 FROM cells c JOIN labs lab ON lab.id = c.lab_id
                 JOIN specimens s ON s.id = c.specimen_id WHERE c.id = %s""",
            (cell_id,),
        ).fetchone()
        if row is None or not caller.sees_lab(row["lab_id"]):
            raise NotFound(f"cell {cell_id} does not exist", field="cell_id")
        return row

    @app.get("/v1/cells/{cell_id}", summary="A cell, its label and the label's history")
    def get_cell(cell_id: int, caller: Caller) -> dict:
        with db.connection() as conn:
            cell = _cell(conn, caller, cell_id)
            label = conn.execute(
                "SELECT class_code, source, round_added, updated_at FROM labels WHERE cell_id = %s",
                (cell_id,),
            ).fetchone()
            history = labels.label_history(conn, cell_id)
        return {
            "id": cell["id"],
            "lab": cell["lab"],
            "specimen": cell["specimen"],
            "is_test": cell["is_test"],
            "status": cell["status"],
            "bbox": [cell["x0"], cell["y0"], cell["x1"], cell["y1"]],
            "image_url": f"/v1/cells/{cell_id}/image",
            "label": label,
            "history": history,
        }

    @app.get(
        "/v1/cells/{cell_id}/image",
        summary="The cell's crop, streamed after the auth and lab checks",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    def cell_image(cell_id: int, caller: Caller) -> Response:
        with db.connection() as conn:
            key = _cell(conn, caller, cell_id)["crop_key"]
        data = runtime.store.get(key)
        media = mimetypes.guess_type(key)[0] or "application/octet-stream"
        return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=600"})

    @app.get(
        "/v1/cells/{cell_id}/field",
        summary="The field around a cell, its box outlined, after the auth and lab checks",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    def cell_field(
        cell_id: int,
        caller: Caller,
        size: Annotated[int, Query(ge=64, le=4096)] = 768,
    ) -> Response:
        """A ``size``-pixel window of the cell's field image centred on the cell (as
        much as the field allows), at the field's own resolution, with the cell's
        bounding box drawn: hematologists judge a cell's size and colour against its
        neighbours. ``X-Field-Window`` gives the window in field pixels."""
        with db.connection() as conn:
            cell = _cell(conn, caller, cell_id)
            if cell["field_id"] is None:
                raise NotFound(
                    f"cell {cell_id} was imported as a crop: it has no field", field="cell_id"
                )
            key = conn.execute(
                "SELECT object_key FROM field_images WHERE id = %s", (cell["field_id"],)
            ).fetchone()["object_key"]
        png, window = field_context.render(
            runtime.store.get(key),
            (cell["x0"], cell["y0"], cell["x1"], cell["y1"]),
            size,
        )
        return Response(
            png,
            media_type="image/png",
            headers={
                "Cache-Control": "private, max-age=600",
                "X-Field-Id": str(cell["field_id"]),
                "X-Field-Window": ",".join(map(str, window)),
            },
        )

    @app.put("/v1/cells/{cell_id}/label", summary="Correct a cell's label (audited)")
    def put_label(cell_id: int, body: LabelIn, caller: Caller) -> dict:
        with db.transaction() as conn:
            after = labels.correct_label(
                conn, caller, taxonomy, cell_id, body.class_code, body.note
            )
        return {"cell_id": cell_id, **after}

    @app.get("/v1/labels/export", summary="Labels as CSV or JSON, filtered")
    def export_labels(
        caller: Caller,
        format: Literal["csv", "json", "imagefolder", "coco"] = "csv",
        round: Annotated[int | None, Query(ge=0)] = None,
        lab: Annotated[str | None, Query(max_length=63)] = None,
        class_code: Annotated[str | None, Query(alias="class", max_length=32)] = None,
    ) -> Response:
        if class_code is not None:
            labels.check_class(taxonomy, class_code, field="class")
        lab_ids = lab_ids_for_codes(db, caller, [lab]) if lab else None
        with db.transaction() as conn:  # labels leave the system: audited before they do
            labels.record_export(
                conn, caller, round_number=round, lab_ids=lab_ids, class_code=class_code
            )

        def streamed(export_rows, write):
            # One connection for the export's server-side cursor, held while it streams.
            with db.connection() as conn:
                rows = export_rows(
                    conn,
                    caller,
                    round_number=round,
                    lab_ids=lab_ids,
                    class_code=class_code,
                    limit=settings.export_max_rows,
                )
                yield from write(rows)

        def body():
            return streamed(
                labels.export_rows, labels.csv_lines if format == "csv" else labels.json_chunks
            )

        def zipped():
            if format == "imagefolder":
                return streamed(
                    exports.export_rows, lambda rows: exports.imagefolder_zip(rows, runtime.store)
                )
            return streamed(
                exports.export_rows, lambda rows: exports.coco_zip(rows, runtime.store, taxonomy)
            )

        if format in ("imagefolder", "coco"):
            return StreamingResponse(
                zipped(),
                media_type="application/zip",
                headers={"Content-Disposition": f'attachment; filename="labels-{format}.zip"'},
            )
        if format == "csv":
            return StreamingResponse(
                body(),
                media_type="text/csv",
                headers={"Content-Disposition": 'attachment; filename="labels.csv"'},
            )
        return StreamingResponse(body(), media_type="application/json")

    @app.post(
        "/v1/labs/{lab}/specimens/{specimen}/crops",
        summary="Import one labelled single-cell image into a specimen (idempotent, audited)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"image/png": {}, "image/jpeg": {}, "image/tiff": {}},
            }
        },
    )
    async def import_crop(
        lab: str,
        specimen: str,
        request: Request,
        caller: Caller,
        class_code: Annotated[str, Query(alias="class", min_length=1, max_length=32)],
    ) -> dict:
        """The body is the image's bytes; ``class`` its taxonomy code. The crop is
        fitted into the segmenter's crop frame and stored as the segmenter stores
        crops; the cell has no field and its label has source ``import``. The same
        bytes again in the same specimen answer ``duplicate: true`` and change
        nothing; a bad image is refused (400, field ``image``) with nothing written."""
        specimens.check_code(lab, "lab")
        specimens.check_code(specimen, "specimen")
        data = await request.body()

        def run() -> imports.Imported:
            with db.connection() as conn:
                return imports.import_crop(
                    db,
                    conn,
                    runtime.store,
                    caller,
                    taxonomy,
                    lab=lab,
                    specimen=specimen,
                    class_code=class_code,
                    data=data,
                    limits=images.Limits(
                        settings.max_body_bytes,
                        settings.import_max_pixels,
                        bytes_setting="BMCELL_MAX_BODY_BYTES",
                        pixels_setting="BMCELL_IMPORT_MAX_PIXELS",
                    ),
                    crop_size=settings.crop_size,
                )

        done = await run_in_threadpool(run)
        return {
            "cell_id": done.cell_id,
            "sha256": done.sha256,
            "duplicate": done.duplicate,
            "class_code": done.class_code,
        }

    @app.get("/v1/rounds/current/progress", summary="Review progress of the current round")
    def round_progress(caller: Caller, round_id: Annotated[int | None, Query(ge=1)] = None) -> dict:
        with db.connection() as conn:
            return queue.progress(conn, caller, round_id)

    @app.get("/v1/labs", summary="Labs the caller sees, with their specimen counts")
    def get_labs(caller: Caller) -> dict:
        with db.connection() as conn:
            return {"labs": specimens.list_labs(conn, caller)}

    @app.post("/v1/labs", status_code=201, summary="Create a lab (audited)")
    def post_lab(body: LabIn, caller: Caller) -> dict:
        with db.transaction() as conn:
            return specimens.add_lab(conn, body.code, body.name)

    @app.get("/v1/specimens", summary="Specimens the caller sees, with their roles")
    def get_specimens(
        caller: Caller,
        lab: Annotated[str | None, Query(max_length=63)] = None,
        role: Annotated[str | None, Query(max_length=32)] = None,
    ) -> dict:
        with db.connection() as conn:
            return {"specimens": specimens.list_specimens(conn, caller, lab=lab, role=role)}

    @app.put(
        "/v1/specimens/{lab}/{specimen}/role",
        summary="Set a specimen's role: training, test or excluded (audited)",
        responses={409: {"description": "the specimen is in use; send force to override"}},
    )
    def put_specimen_role(lab: str, specimen: str, body: SpecimenRoleIn, caller: Caller) -> dict:
        with db.transaction() as conn:
            return specimens.set_role(conn, caller, lab, specimen, body.role, force=body.force)

    @app.get("/v1/users", summary="Every user with role, labs and live token count")
    def get_users(_caller: Caller) -> dict:
        with db.connection() as conn:
            return {"users": [_user_json(r) for r in users.list_users(conn)]}

    @app.post("/v1/users", status_code=201, summary="Create a user (audited)")
    def post_user(body: UserIn, _caller: Caller) -> dict:
        with db.transaction() as conn:
            users.add_user(conn, body.name, body.role, body.labs)
            return _user_json(users.get_user(conn, body.name))

    @app.patch("/v1/users/{name}", summary="Change a user's role or labs, or disable them")
    def patch_user(name: str, body: UserChangeIn, _caller: Caller) -> dict:
        if body.role is None and body.labs is None and body.disabled is None:
            raise InvalidArgument("give role, labs or disabled", field="role")
        with db.transaction() as conn:
            if body.role is not None or body.labs is not None:
                users.change_user(conn, name, role=body.role, lab_codes=body.labs)
            if body.disabled is not None:
                users.set_disabled(conn, name, body.disabled)
            return _user_json(users.get_user(conn, name))

    @app.post(
        "/v1/users/{name}/tokens",
        status_code=201,
        summary="Issue an API token; the secret is in this answer only (audited)",
    )
    def post_token(name: str, body: TokenIn, _caller: Caller) -> dict:
        with db.transaction() as conn:
            issued = users.issue_token(conn, name, body.expires_days)
        return {
            "name": name,
            "token": issued.token,
            "prefix": issued.prefix,
            "expires_at": _iso(issued.expires_at),
        }

    # Differential counts: their own module (predict on demand, read, sign off).
    reports.register(app, runtime, Caller)

    return app


def _user_json(row: dict) -> dict:
    return {
        "name": row["name"],
        "role": row["role"],
        "labs": row["labs"],
        "disabled": row["disabled_at"] is not None,
        "live_tokens": row["live_tokens"],
    }


def route_calls(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path template) of every route and mount: what bmcell.policy.HTTP must
    cover (a mount, like /static, answers GET)."""
    calls = []
    for route in app.routes:
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if method != "HEAD":
                calls.append((method, route.path))
    return calls
