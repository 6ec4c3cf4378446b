"""``bmcell review --simulate``: answer review tasks from synthetic ground truth.

Thin wrapper over :func:`bmcell.review_sim.simulate_reviews`: reviewers are users
made with an admin's token (``BMCELL_ADMIN_TOKEN``, else ``BMCELL_TOKEN``) through the
labeling API at ``BMCELL_LABELAPI_URL``, and answer through it; a manifest's cells are
placed through the segmenter (``BMCELL_SEGMENTER_ADDR``). The embedded stack's env
file supplies all of them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from bmcell.errors import BmcellError

URL_VAR = "BMCELL_LABELAPI_URL"
KINDS = ("cst", "al", "initial", "validation", "test", "adjudication")


@click.command()
@click.option("--simulate", is_flag=True, help="Answer as simulated reviewers (required).")
@click.option(
    "--truth",
    "truth_path",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="A `bmcell synth` manifest.json (or its folder), or a JSON {cell_id: class} mapping.",
)
@click.option("--reviewers", default=3, show_default=True, type=click.IntRange(1, 64))
@click.option("--error-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1))
@click.option("--difficult-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--until-empty/--keep-polling",
    default=True,
    show_default=True,
    help="Stop once every reviewer finds the queue empty (else poll until --max-tasks/--timeout).",
)
@click.option("--max-tasks", type=click.IntRange(min=1), help="Stop after this many leases.")
@click.option("--timeout", type=click.FloatRange(min=1), help="Stop after this many seconds.")
@click.option("--kind", type=click.Choice(KINDS), help="Only tasks of this kind.")
@click.option("--lab", "labs", multiple=True, help="Only tasks of this lab (repeat).")
@click.option(
    "--adjudicate/--no-adjudicate",
    default=True,
    show_default=True,
    help="Run an admin (sim-adjudicator) that answers adjudication tasks.",
)
@click.option(
    "--on-unknown",
    type=click.Choice(["difficult", "confirm"]),
    default="difficult",
    show_default=True,
    help="Answer for a cell the truth cannot place.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
@click.option("--answers", type=click.Path(path_type=Path), help="Write every answer as JSON.")
def review(
    simulate: bool,
    truth_path: Path,
    reviewers: int,
    error_rate: float,
    difficult_rate: float,
    seed: int,
    until_empty: bool,
    max_tasks: int | None,
    timeout: float | None,
    kind: str | None,
    labs: tuple[str, ...],
    adjudicate: bool,
    on_unknown: str,
    as_json: bool,
    answers: Path | None,
) -> None:
    """Answer review tasks through the labeling API (simulated reviewers)."""
    from bmcell.review_sim import TruthIndex, simulate_reviews

    if not simulate:
        raise click.UsageError("only --simulate is available; people review on the web page")
    if not until_empty and max_tasks is None and timeout is None:
        raise click.UsageError("--keep-polling needs --max-tasks or --timeout")
    url = os.environ.get(URL_VAR)
    if not url:
        raise click.ClickException(f"{URL_VAR} is not set (run `bmcell stack up` or export it)")
    admin = os.environ.get("BMCELL_ADMIN_TOKEN") or os.environ.get("BMCELL_TOKEN")
    if not admin:
        raise click.ClickException("an admin's token is needed: BMCELL_ADMIN_TOKEN or --token")
    try:
        from bmcell.cli.common import address
        from bmcell.scenario import segmenter_cells

        cells = segmenter_cells(address("BMCELL_SEGMENTER_ADDR"), admin)
        truth = TruthIndex.load(truth_path, cells)
        click.echo(f"truth: {len(truth)} cell(s) placed", err=True)
        stats = simulate_reviews(
            url,
            admin,
            truth,
            reviewers=reviewers,
            error_rate=error_rate,
            difficult_rate=difficult_rate,
            seed=seed,
            stop_when_empty=until_empty,
            max_tasks=max_tasks,
            kind=kind,
            labs=list(labs) or None,
            adjudicate=adjudicate,
            on_unknown=on_unknown,
            timeout_s=timeout,
        )
    except (BmcellError, ValueError, RuntimeError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    if answers is not None:
        answers.write_text(json.dumps(stats.answers, indent=1) + "\n")
    if as_json:
        click.echo(json.dumps(stats.to_json()))
        return
    click.echo(
        f"reviews {stats.reviews} ({stats.tasks_per_s:.1f} tasks/s): confirms {stats.confirms}, "
        f"corrections {stats.corrections}, difficult {stats.difficult}; errors injected "
        f"{stats.errors_injected}; adjudications answered {stats.adjudications}, "
        f"sent to adjudication {stats.adjudications_created}; unknown truth "
        f"{stats.unknown_truth}; lost leases {stats.conflicts}; stopped: {stats.stopped}"
    )
