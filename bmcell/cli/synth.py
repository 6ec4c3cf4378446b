"""``bmcell synth``: write a synthetic specimen set (fields + manifest) or crops."""

from __future__ import annotations

import os
import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn


@click.command("synth")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to write into (created).",
)
@click.option("--labs", default=3, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--specimens",
    default=2,
    show_default=True,
    type=click.IntRange(min=1),
    help="Specimens per lab.",
)
@click.option(
    "--fields",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="Fields per specimen.",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--size",
    default=704,
    show_default=True,
    type=click.IntRange(min=64),
    help="Field edge in pixels.",
)
@click.option(
    "--crops-per-class",
    default=None,
    type=click.IntRange(min=1),
    help="Write this many 282x282 single-cell crops per class and lab instead of fields.",
)
def synth(
    out_dir: Path,
    labs: int,
    specimens: int,
    fields: int,
    seed: int,
    size: int,
    crops_per_class: int | None,
) -> None:
    """Generate May-Grünwald-Giemsa-like bone marrow fields with known truth."""
    from bmcell.synth import generate_crops, generate_dataset

    console = Console()
    what = "crops" if crops_per_class else "fields"
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(f"synth {what}", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        start = time.perf_counter()
        if crops_per_class:
            result = generate_crops(out_dir, crops_per_class, seed, labs=labs, progress=progress)
            count = len(result.crops)
            index = out_dir / "crops.json"
        else:
            manifest = generate_dataset(
                out_dir,
                labs,
                specimens,
                fields,
                seed,
                size,
                progress=progress,
                workers=len(os.sched_getaffinity(0)),  # the same fields, sooner
            )
            count = len(manifest.fields())
            index = out_dir / "manifest.json"
        elapsed = time.perf_counter() - start
    console.print(
        f"wrote {count} {what} to {out_dir} ({index.name}) in {elapsed:.1f}s: "
        f"{count / elapsed:.1f} {what}/s"
    )
