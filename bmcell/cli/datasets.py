"""``bmcell import`` and ``bmcell export``: labelled cells in and out, through the
labeling API (``BMCELL_LABELAPI_URL``) with the caller's token (``BMCELL_TOKEN``).

Import reads an ImageFolder (``DIR/<class name>/*.png|jpg|jpeg|tif|tiff``), checks
every folder name against the labeling API's taxonomy before sending a byte (a
mapping file maps names to codes; a name equal to a code needs none), then sends
each file on its own (``POST /v1/labs/{lab}/specimens/{specimen}/crops``), so a bad
file is refused alone and the rest go on. Export streams the route
``GET /v1/labels/export`` into a file.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click
import httpx

from bmcell import datasets
from bmcell.cli.common import api_call, labelapi
from bmcell.errors import InvalidArgument
from bmcell.taxonomy import Taxonomy


@dataclass
class ImportSummary:
    imported: list[str] = field(default_factory=list)
    duplicate: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    by_class: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "imported": len(self.imported),
            "duplicate": len(self.duplicate),
            "refused": [{"file": f, "reason": r} for f, r in self.refused],
            "by_class": self.by_class,
        }


def server_taxonomy(client: httpx.Client) -> Taxonomy:
    """The taxonomy the labeling API checks labels against."""
    return Taxonomy.from_json(api_call(client, "GET", "/v1/taxonomy"))


def plan_import(
    root: Path, mapping: dict[str, str], taxonomy: Taxonomy
) -> tuple[list[datasets.FolderFile], dict[str, str], list[Path]]:
    """The files to send and each folder's code; InvalidArgument listing every folder
    name that maps to nothing (nothing is sent then)."""
    names, files, skipped = datasets.scan_imagefolder(root)
    if not names:
        raise InvalidArgument(f"{root} has no class folders", field="dir")
    codes = datasets.resolve_classes(names, mapping, taxonomy)
    return files, codes, skipped


def import_folder(
    client: httpx.Client,
    *,
    lab: str,
    specimen: str,
    root: Path,
    mapping: dict[str, str],
    taxonomy: Taxonomy,
    on_file: Callable[[], None] = lambda: None,
) -> ImportSummary:
    files, codes, skipped = plan_import(root, mapping, taxonomy)
    summary = ImportSummary()
    for path in skipped:
        summary.refused.append((str(path.relative_to(root)), "not an image file (suffix)"))
    for item in files:
        name = str(item.path.relative_to(root))
        code = codes[item.class_name]
        try:
            resp = client.post(
                f"/v1/labs/{lab}/specimens/{specimen}/crops",
                params={"class": code},
                content=item.path.read_bytes(),
                headers={"Content-Type": "application/octet-stream"},
            )
        except (OSError, httpx.HTTPError) as exc:
            summary.refused.append((name, f"{type(exc).__name__}: {exc}"))
            on_file()
            continue
        if resp.status_code >= 400:
            summary.refused.append((name, _reason(resp)))
            if resp.status_code in (401, 403):  # the same for every file: stop here
                raise click.ClickException(f"{resp.status_code}: {_reason(resp)}")
        else:
            body = resp.json()
            (summary.duplicate if body["duplicate"] else summary.imported).append(name)
            summary.by_class[body["class_code"]] = summary.by_class.get(body["class_code"], 0) + 1
        on_file()
    return summary


def _reason(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        message = body.get("error") or resp.text
    except ValueError:
        message = resp.text.strip() or resp.reason_phrase
    return f"{resp.status_code}: {message}"


@click.command("import")
@click.option("--lab", required=True, help="The lab the cells belong to.")
@click.option("--specimen", required=True, help="The specimen they are filed under.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["imagefolder"]),
    default="imagefolder",
    show_default=True,
    help="DIR/<class name>/*.png|jpg|jpeg|tif|tiff",
)
@click.option(
    "--map",
    "map_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML of 'folder name: CODE' lines; names equal to a code need none.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
def import_command(
    lab: str, specimen: str, fmt: str, map_file: Path | None, as_json: bool, directory: Path
) -> None:
    """Import labelled single-cell images (operators and admins).

    Each image is fitted into the 282x282 crop frame, stored as the segmenter stores
    crops, and labelled with source 'import'. Importing the same files again changes
    nothing; bad files are refused one by one, with the reason, and the rest go on.
    """
    del fmt  # one format for now; the option names it so scripts say what they send
    try:
        mapping = (
            datasets.parse_mapping(map_file.read_text(), source=str(map_file)) if map_file else {}
        )
        with labelapi() as client:
            taxonomy = server_taxonomy(client)
            files, _codes, _skipped = plan_import(directory, mapping, taxonomy)
            with click.progressbar(length=len(files), label="importing", file=sys.stderr) as bar:
                summary = import_folder(
                    client,
                    lab=lab,
                    specimen=specimen,
                    root=directory,
                    mapping=mapping,
                    taxonomy=taxonomy,
                    on_file=lambda: bar.update(1),
                )
    except InvalidArgument as exc:
        click.echo(f"error ({exc.field}): {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(summary.to_json()))
    else:
        click.echo(
            f"imported {len(summary.imported)}, duplicate {len(summary.duplicate)}, "
            f"refused {len(summary.refused)}"
        )
        for name, reason in summary.refused:
            click.echo(f"  refused {name}: {reason}")
    if summary.refused:
        sys.exit(2)


@click.command("export")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["imagefolder", "coco", "csv"]),
    default="imagefolder",
    show_default=True,
    help="imagefolder: <code>/<cell_id>.png + manifest.csv; coco: fields + annotations.json",
)
@click.option("--round", "round_number", type=int, help="Only labels of this round.")
@click.option("--lab", help="Only this lab's labels.")
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The file to write (a .zip, or .csv).",
)
def export_command(fmt: str, round_number: int | None, lab: str | None, out: Path) -> None:
    """Export labelled cells with their images (reviewers, operators, admins)."""
    params: dict[str, object] = {"format": fmt}
    if round_number is not None:
        params["round"] = round_number
    if lab:
        params["lab"] = lab
    part = out.with_name(out.name + ".part")
    with labelapi() as client, client.stream("GET", "/v1/labels/export", params=params) as resp:
        if resp.status_code >= 400:
            resp.read()
            click.echo(f"error: {_reason(resp)}", err=True)
            sys.exit(1)
        written, shown = 0, 0
        with part.open("wb") as fh:  # the size is unknown until the end: a byte count
            for chunk in resp.iter_bytes():
                fh.write(chunk)
                written += len(chunk)
                if written - shown >= 1 << 20:
                    shown = written
                    click.echo(f"\rexport {fmt}: {written >> 20} MiB", err=True, nl=False)
    part.replace(out)  # a broken stream leaves no file that looks whole
    click.echo(f"{out}: {written} bytes", err=True)
