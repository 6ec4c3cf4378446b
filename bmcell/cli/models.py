"""``bmcell models list | activate | rollback`` and ``bmcell classify``: the classifier service.

Both talk to the classifier at ``BMCELL_CLASSIFIER_ADDR`` (the embedded stack's env
file supplies it after ``bmcell stack up``). A failed call prints one line naming
the gRPC status and exits with code 1.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import click
import grpc
from rich.console import Console
from rich.table import Table

from bmcell import paging
from bmcell.cli.common import channel
from bmcell.v1 import classifier_pb2, classifier_pb2_grpc

T = TypeVar("T")

ADDR_VAR = "BMCELL_CLASSIFIER_ADDR"
BATCH = 64
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
#: Activation loads a version into Triton, which can take a while on a cold server.
ACTIVATE_TIMEOUT_S = 300.0


@contextmanager
def _stub(timeout_s: float = 60.0) -> Iterator[classifier_pb2_grpc.ClassifierStub]:
    with channel(ADDR_VAR, timeout_s) as ch:
        yield classifier_pb2_grpc.ClassifierStub(ch)


def _call(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except grpc.RpcError as exc:
        code = exc.code().name if exc.code() is not None else "UNKNOWN"
        detail = (exc.details() or "").splitlines()[0] if exc.details() else ""
        click.echo(f"error: {code}: {detail}", err=True)
        sys.exit(1)


def _version_json(v, active: int) -> dict:
    return {
        "model_name": v.model_name,
        "version": v.version,
        "state": v.state,
        "active": v.version == active,
        "input_size": v.input_size,
        "classes": list(v.classes),
        "validation_accuracy": v.validation_accuracy or None,
        "test_accuracy": v.test_accuracy or None,
        "created_at": v.created_at,
        "round_id": v.round_id or None,
        "note": v.note,
    }


def _acc(x: float) -> str:
    return f"{x:.3f}" if x else "-"


@click.group()
def models() -> None:
    """Model versions the classifier serves: list, activate, roll back."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_models(as_json: bool) -> None:
    """Every registered version; the active one is marked."""
    with _stub() as stub:
        first = _call(lambda: stub.ListModels(classifier_pb2.ListModelsRequest()))
        versions = list(first.versions)
        if first.next_page_token:  # more than one page: follow them all
            versions += _call(
                lambda: list(
                    paging.follow(
                        stub.ListModels,
                        classifier_pb2.ListModelsRequest(page_token=first.next_page_token),
                        "versions",
                    )
                )
            )
    active = first.active_version
    rows = [_version_json(v, active) for v in versions]
    if as_json:
        click.echo(json.dumps({"active_version": active, "versions": rows}, indent=2))
        return
    table = Table(title="model versions")
    for col in ("", "version", "state", "input", "val acc", "test acc", "created", "note"):
        table.add_column(col)
    for v in versions:
        table.add_row(
            "*" if v.version == active else "",
            str(v.version),
            v.state,
            f"{v.input_size}x{v.input_size}",
            _acc(v.validation_accuracy),
            _acc(v.test_accuracy),
            v.created_at[:19].replace("T", " "),
            v.note,
        )
    # piped output keeps whole rows (rich would wrap at 80 columns)
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    if not versions:
        click.echo("no model versions registered")


def _print_version(verb: str, v) -> None:
    click.echo(f"{verb} {v.model_name} version {v.version} (state {v.state})")


@models.command()
@click.argument("version", type=click.IntRange(min=1))
def activate(version: int) -> None:
    """Load VERSION into Triton and make it the default."""
    with _stub(ACTIVATE_TIMEOUT_S) as stub:
        v = _call(lambda: stub.ActivateModel(classifier_pb2.ActivateModelRequest(version=version)))
    _print_version("activated", v)


@models.command()
def rollback() -> None:
    """Make the previously active version the default again."""
    with _stub(ACTIVATE_TIMEOUT_S) as stub:
        v = _call(lambda: stub.RollbackModel(classifier_pb2.RollbackModelRequest()))
    _print_version("rolled back to", v)


def _image_files(paths: tuple[Path, ...]) -> list[Path]:
    """Files named directly (whatever they hold) and the image files inside folders."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(
                f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            )
        else:
            files.append(p)
    return files


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one entry per file.")
@click.option("--top", default=3, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--version",
    "model_version",
    default=0,
    type=click.IntRange(min=0),
    help="Model version (default: the active one).",
)
def classify(paths: tuple[Path, ...], as_json: bool, top: int, model_version: int) -> None:
    """Classify cell crops (image files, or folders of them) through the classifier."""
    files = _image_files(paths)
    if not files:
        raise click.ClickException("no image files found")
    out: list[dict] = []
    with _stub() as stub:
        for i in range(0, len(files), BATCH):
            chunk = files[i : i + BATCH]
            request = classifier_pb2.ClassifyRequest(
                images=[f.read_bytes() for f in chunk], model_version=model_version
            )
            resp = _call(lambda request=request: stub.Classify(request))
            for f, r in zip(chunk, resp.results, strict=True):
                probs = list(r.probabilities)
                order = sorted(range(len(probs)), key=lambda k: -probs[k])[:top]
                out.append(
                    {
                        "path": str(f),
                        "model_name": resp.model_name,
                        "model_version": resp.model_version,
                        "top": [{"class": r.classes[k], "probability": probs[k]} for k in order],
                        "probabilities": dict(zip(r.classes, probs, strict=True)),
                    }
                )
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    for e in out:
        tops = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in e["top"])
        click.echo(f"{e['path']}: {tops} (v{e['model_version']})")
