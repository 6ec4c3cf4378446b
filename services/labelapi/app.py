"""HTTP surface of the labeling API (FastAPI). OpenAPI is published at /openapi.json."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bmcell.errors import BmcellError
from bmcell.runtime import Runtime
from bmcell.settings import LabelApiSettings


def create_app(runtime: Runtime[LabelApiSettings]) -> FastAPI:
    app = FastAPI(title="bmcell labeling API", version="1", openapi_url="/openapi.json")
    app.state.rt = runtime

    @app.exception_handler(BmcellError)
    async def bmcell_error(_request: Request, exc: BmcellError) -> JSONResponse:
        return JSONResponse(
            status_code=exc.http_status, content={"error": exc.message, "field": exc.field}
        )

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict:
        with runtime.db.connection() as conn:
            conn.execute("SELECT 1")
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
