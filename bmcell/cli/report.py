"""``bmcell report specimen S``: a specimen's differential count.

Reads Postgres (``BMCELL_DATABASE_URL``) and object storage (``BMCELL_S3_*``, for the
HTML gallery's thumbnails). When ``BMCELL_CLASSIFIER_ADDR`` is set, cells of the
specimen with no prediction of the active model version are first sent through the
classifier's ``PredictPool`` (with a deadline, ``--predict-timeout``); if that fails
the report still comes out, counting those cells as unclassified.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from bmcell import db as dbmod
from bmcell import report as rep
from bmcell.errors import BmcellError
from bmcell.settings import Settings, load

ADDR_VAR = "BMCELL_CLASSIFIER_ADDR"


def _predict_missing(
    database: dbmod.Database, spec: dict, model: dict, model_name: str, timeout_s: float
) -> None:
    import grpc

    from bmcell.grpc_client import channel
    from bmcell.v1 import classifier_pb2, classifier_pb2_grpc

    with database.connection() as conn:
        missing = rep.unpredicted_cells(conn, spec["id"], model_name, model["version"])
    if not missing:
        return
    click.echo(f"classifying {len(missing)} cell(s) without a prediction ...", err=True)
    try:
        # PredictPool is an operator's call (bmcell.policy): without such a token the
        # report still comes out, as the warning below says.
        token = os.environ.get("BMCELL_TOKEN")
        with channel(os.environ[ADDR_VAR], default_timeout_s=timeout_s, token=token) as ch:
            stub = classifier_pb2_grpc.ClassifierStub(ch)
            request = classifier_pb2.PredictPoolRequest(
                cell_ids=missing, model_version=model["version"]
            )
            for _ in stub.PredictPool(request, timeout=timeout_s):
                pass
    except grpc.RpcError as exc:
        code = exc.code().name if exc.code() is not None else "UNKNOWN"
        click.echo(
            f"warning: PredictPool failed ({code}: {exc.details()}); "
            "those cells are reported as unclassified",
            err=True,
        )


@click.group()
def report() -> None:
    """Differential counts."""


@report.command("specimen")
@click.argument("specimen")
@click.option("--lab", help="Lab code (needed when the specimen code exists in several labs).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json", "html"]),
    default="text",
    show_default=True,
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write to a file.")
@click.option(
    "--min-confidence",
    default=rep.DEFAULT_MIN_CONFIDENCE,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Cells whose top-1 probability is below this are listed for review.",
)
@click.option(
    "--per-class",
    default=rep.DEFAULT_PER_CLASS,
    show_default=True,
    type=click.IntRange(0, 500),
    help="Gallery thumbnails per class (HTML).",
)
@click.option(
    "--predict/--no-predict",
    default=True,
    show_default=True,
    help=f"Classify unpredicted cells first when {ADDR_VAR} is set.",
)
@click.option("--predict-timeout", default=120.0, show_default=True, type=click.FloatRange(1))
def specimen(
    specimen: str,
    lab: str | None,
    fmt: str,
    out: Path | None,
    min_confidence: float,
    per_class: int,
    predict: bool,
    predict_timeout: float,
) -> None:
    """Counts, percentages, M:E ratio and low-confidence cells of SPECIMEN."""
    try:
        settings = load(Settings)
        database = dbmod.Database(settings, name="bmcell-report").open()
    except BmcellError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        with database.connection() as conn:
            spec = rep.find_specimen(conn, specimen, lab)
            model = rep.active_model(conn, settings.model_name)
        if predict and model is not None and os.environ.get(ADDR_VAR):
            _predict_missing(database, spec, model, settings.model_name, predict_timeout)
        with database.connection() as conn:
            body = rep.specimen_report(
                conn,
                spec["code"],
                lab=spec["lab"],
                model_name=settings.model_name,
                min_confidence=min_confidence,
            )
        if fmt == "json":
            text = json.dumps(rep.public(body), indent=1)
        elif fmt == "html":
            from bmcell.storage import ObjectStore

            store = ObjectStore(settings)
            thumbs = rep.thumbnails(body, store.get, per_class) if per_class else {}
            text = rep.render_html(body, thumbs, per_class=per_class)
        else:
            text = rep.to_text(body)
    except BmcellError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    finally:
        database.close()
    if out is None:
        click.echo(text)
    else:
        out.write_text(text + ("\n" if not text.endswith("\n") else ""))
        click.echo(f"wrote {out}", err=True)
