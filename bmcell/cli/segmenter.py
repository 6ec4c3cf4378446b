"""``bmcell upload``, ``bmcell cells`` and ``bmcell segmenter train | eval``.

Upload and cells talk to the segmenter at ``BMCELL_SEGMENTER_ADDR`` (the embedded
stack's ``.run/stack.env`` supplies it) with the caller's API token (``--token`` or
``BMCELL_TOKEN``, from ``bmcell users token NAME``); train publishes weights to object storage
(``BMCELL_S3_*``); eval runs in this process against a synthetic manifest.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

import click
import grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from bmcell.cli.common import address, api_token

console = Console(stderr=True)
SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
# Truth masks that `bmcell synth` writes beside each field: not field images.
SKIP_SUFFIXES = (".instances.png", ".nuclei.png")
CHUNK = 1 << 20


_token_option = click.option(
    "--token",
    envvar="BMCELL_TOKEN",
    show_envvar=True,
    help="Your API token (`bmcell users token NAME`); uploaders upload to their own labs.",
)


def _metadata(token: str | None) -> tuple[tuple[str, str]]:
    from bmcell.grpc_client import bearer

    return bearer(api_token(token))


def _field_files(paths: tuple[Path, ...]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        candidates = sorted(path.rglob("*")) if path.is_dir() else [path]
        found += [
            p
            for p in candidates
            if p.is_file()
            and (p.suffix.lower() in SUFFIXES or not path.is_dir())
            and not p.name.endswith(SKIP_SUFFIXES)
        ]
    return found


def _requests(
    path: Path, lab: str, specimen: str, diagnosis: str, role: str, um_per_px: float | None
) -> Iterator:
    from bmcell.v1 import segmenter_pb2

    data = path.read_bytes()
    yield segmenter_pb2.UploadRequest(
        header=segmenter_pb2.UploadHeader(
            lab=lab,
            specimen=specimen,
            diagnosis=diagnosis,
            filename=path.name,
            sha256=hashlib.sha256(data).hexdigest(),
            role=role,
            um_per_px=um_per_px,
        )
    )
    for start in range(0, len(data), CHUNK):
        yield segmenter_pb2.UploadRequest(chunk=data[start : start + CHUNK])


@click.command("upload")
@click.option(
    "--lab",
    required=True,
    help="Lab code, e.g. lab-a (`bmcell labs add`; an operator's first upload also creates it).",
)
@click.option("--specimen", required=True, help="Specimen code (created on first upload).")
@click.option("--diagnosis", default="", help="Specimen diagnosis, e.g. AML.")
@click.option(
    "--role",
    type=click.Choice(["training", "test", "excluded"]),
    default=None,
    help="A new specimen's role (default training); an existing one keeps its own "
    "(`bmcell specimens set-role` changes it).",
)
@click.option(
    "--um-per-px",
    type=click.FloatRange(min=0, max=100, min_open=True, max_open=True),
    default=None,
    help="Micrometres per pixel of these fields, when known (the reviewer's scale bar).",
)
@click.option(
    "--jobs",
    default=4,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Uploads in flight at once.",
)
@click.option(
    "--timeout",
    default=300.0,
    show_default=True,
    type=click.FloatRange(min=1),
    help="Deadline of each upload in seconds.",
)
@_token_option
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
def upload(
    lab: str,
    specimen: str,
    diagnosis: str,
    role: str | None,
    um_per_px: float | None,
    jobs: int,
    timeout: float,
    token: str | None,
    paths: tuple[Path, ...],
) -> None:
    """Upload field images (PNG, JPEG, TIFF; files or folders) of one specimen."""
    from bmcell.grpc_client import channel
    from bmcell.v1 import segmenter_pb2_grpc

    metadata = _metadata(token)
    files = _field_files(paths)
    if not files:
        raise click.UsageError("no PNG, JPEG or TIFF files under the given paths")
    totals = {"fields": 0, "cells": 0, "border_cells": 0, "duplicates": 0, "errors": 0}
    with channel(address("BMCELL_SEGMENTER_ADDR"), default_timeout_s=timeout) as ch:
        stub = segmenter_pb2_grpc.SegmenterStub(ch)
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
        ) as bar:
            task = bar.add_task("upload", total=len(files))
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                futures = {
                    pool.submit(
                        stub.Upload,
                        _requests(p, lab, specimen, diagnosis, role or "", um_per_px),
                        metadata=metadata,
                    ): p
                    for p in files
                }
                for future in as_completed(futures):
                    path = futures[future]
                    try:
                        r = future.result()
                    except grpc.RpcError as exc:
                        totals["errors"] += 1
                        bar.console.print(f"[red]{path}[/]: {exc.code().name}: {exc.details()}")
                    else:
                        totals["fields"] += 1
                        totals["duplicates"] += int(r.duplicate)
                        totals["cells"] += r.cells
                        totals["border_cells"] += r.border_cells
                    bar.advance(task)
    console.print(
        f"fields {totals['fields']} (duplicates {totals['duplicates']}), cells {totals['cells']} "
        f"(border, excluded: {totals['border_cells']}), errors {totals['errors']}"
    )
    if totals["errors"]:
        sys.exit(1)


@click.command("cells")
@click.option("--specimen", default=None, help="Specimen code.")
@click.option("--lab", default=None, help="Lab code.")
@click.option("--field-id", default=0, type=int, help="Only this field's cells.")
@click.option("--limit", default=0, type=click.IntRange(min=0), help="At most this many (0: all).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_token_option
def cells(
    specimen: str | None,
    lab: str | None,
    field_id: int,
    limit: int,
    as_json: bool,
    token: str | None,
) -> None:
    """Segmented cells of a specimen, lab or field (those of your labs), with their
    morphometrics."""
    from google.protobuf.json_format import MessageToDict
    from rich.table import Table

    from bmcell import paging
    from bmcell.grpc_client import channel
    from bmcell.v1 import segmenter_pb2, segmenter_pb2_grpc

    metadata = _metadata(token)
    with channel(address("BMCELL_SEGMENTER_ADDR"), default_timeout_s=60) as ch:
        stub = segmenter_pb2_grpc.SegmenterStub(ch)
        request = segmenter_pb2.ListCellsRequest(
            lab=lab or "",
            specimen=specimen or "",
            field_id=field_id,
            page_size=limit if 0 < limit <= 1000 else 0,  # 1000: the server's default cap
        )
        found = []
        try:  # page after page, until the last or until --limit
            for c in paging.follow(
                lambda r: stub.ListCells(r, metadata=metadata), request, "cells"
            ):
                found.append(c)
                if limit and len(found) >= limit:
                    break
        except grpc.RpcError as exc:
            raise click.ClickException(f"{exc.code().name}: {exc.details()}") from exc
    rows = [
        MessageToDict(
            c, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        for c in found
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    table = Table("cell", "field", "bbox", "area", "N:C", "axis", "waist", "status")
    for c in found:
        m, b = c.morphometrics, c.bbox
        table.add_row(
            str(c.cell_id),
            str(c.field_id),
            f"{b.x0},{b.y0},{b.x1},{b.y1}",
            f"{m.cell_area_px:.0f}",
            f"{m.nucleus_cell_ratio:.2f}",
            f"{m.nucleus_axis_ratio:.2f}",
            f"{m.nucleus_narrowest_widest_ratio:.2f}",
            c.status,
        )
    Console().print(table)


@click.group("segmenter")
def segmenter() -> None:
    """Train and evaluate the field segmentation network."""


@segmenter.command("train")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the weights to this file.",
)
@click.option(
    "--fields",
    default=48,
    show_default=True,
    type=click.IntRange(min=1),
    help="Synthetic training fields.",
)
@click.option("--epochs", default=14, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--labs",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Synthetic labs (stains) the fields come from.",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--publish/--no-publish",
    default=True,
    show_default=True,
    help="Store as the next version in object storage (segmenter/<name>-vN.pt).",
)
def train(
    out: Path | None, fields: int, epochs: int, labs: int, seed: int, threads: int, publish: bool
) -> None:
    """Train the U-Net on synthetic fields; the segmenter loads the newest at start."""
    from services.segmenter import unet

    cfg = unet.TrainConfig(fields=fields, epochs=epochs, labs=labs, seed=seed, threads=threads)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("train", total=epochs)

        def progress(epoch: int, total: int, loss: float) -> None:
            bar.update(task, completed=epoch, description=f"train (loss {loss:.3f})")

        model, report = unet.train(cfg, progress)
    command = (
        f"bmcell segmenter train --fields {fields} --epochs {epochs} --labs {labs} --seed {seed}"
    )
    data = unet.to_bytes(
        model,
        {
            "config": asdict(cfg),
            "final_loss": report.final_loss,
            "seconds": round(report.seconds),
            "command": command,
        },
    )
    console.print(
        f"trained in {report.seconds:.0f}s, final loss {report.final_loss:.4f}, "
        f"{len(data) / 1e6:.2f} MB"
    )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
        console.print(f"wrote {out}")
    if publish:
        from bmcell.settings import SegmenterSettings, load
        from bmcell.storage import ObjectStore
        from services.segmenter import models

        settings = load(SegmenterSettings)
        store = ObjectStore(settings).ensure_buckets()
        key = models.publish(store, settings.segmenter_model, data)
        console.print(f"published {settings.data_bucket}/{key}; restart the segmenter to use it")


@segmenter.command("eval")
@click.option(
    "--manifest",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="manifest.json of `bmcell synth` fields.",
)
@click.option(
    "--weights",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Weights file; default: the newest in object storage.",
)
@click.option("--lab", "labs", multiple=True, help="Only fields of this lab (repeatable).")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.argument("fields", nargs=-1)
def eval_(
    manifest: Path,
    weights: Path | None,
    labs: tuple[str, ...],
    threads: int,
    as_json: bool,
    fields: tuple[str, ...],
) -> None:
    """Detection precision/recall/F1 at IoU 0.5 and mean matched IoU vs the manifest.

    FIELDS are field ids (lab-a-s01-f0000) or image paths of the manifest; none means all.
    """
    import torch

    from bmcell.synth import load_manifest
    from services.segmenter import evaluate, models, unet

    torch.set_num_threads(threads)
    if weights is not None:
        model, _ = unet.from_bytes(weights.read_bytes())
        name = str(weights)
    else:
        from bmcell.settings import SegmenterSettings, load
        from bmcell.storage import ObjectStore

        settings = load(SegmenterSettings)
        loaded = models.load_latest(ObjectStore(settings), settings.segmenter_model)
        if loaded is None:
            raise click.ClickException(models.NO_MODEL)
        model, name = loaded.network, loaded.name
    m = load_manifest(manifest)
    root = manifest.parent
    wanted = set(fields)
    chosen = [
        (root / f.image, root / f.instances)
        for spec, f in m.fields()
        if (not labs or spec.lab in labs)
        and (not wanted or f.id in wanted or f.image in wanted or str(root / f.image) in wanted)
    ]
    if not chosen:
        raise click.UsageError("no field of the manifest matches")
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("eval", total=len(chosen))
        result = evaluate.evaluate(model, chosen, lambda _p, _d: bar.advance(task))
    figures = {"model": name, "fields": len(chosen), **result.to_json()}
    if as_json:
        click.echo(json.dumps(figures))
        return
    click.echo(
        f"{name} on {len(chosen)} fields: {result.true_cells} true cells, {result.predicted} "
        f"predicted, {result.matched} matched at IoU > 0.5\n"
        f"precision {result.precision:.4f}  recall {result.recall:.4f}  F1 {result.f1:.4f}  "
        f"mean matched IoU {result.mean_iou:.4f}"
    )


def register(cli: click.Group) -> None:
    for command in (upload, cells, segmenter):
        cli.add_command(command)
