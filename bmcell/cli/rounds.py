"""``bmcell round start | status | retry | history``: the study's rounds, driven by the rounds service."""

from __future__ import annotations

import csv
import io
import json
import time

import click
from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.table import Table

from bmcell import paging
from bmcell.cli.common import channel, rpc_errors
from bmcell.training_progress import progress_line
from bmcell.v1 import rounds_pb2, rounds_pb2_grpc, selector_pb2

ADDR = "BMCELL_ROUNDS_ADDR"
TERMINAL = ("published", "failed")


def _stub() -> rounds_pb2_grpc.RoundsStub:
    return rounds_pb2_grpc.RoundsStub(channel(ADDR))


@click.group("round")
def round_group() -> None:
    """Start rounds and follow them: select, review, train, evaluate, publish."""


@round_group.command("start")
@click.option(
    "--strategy",
    required=True,
    help="bootstrap, cst, al, cst+al, st, random, least_confidence or entropy",
)
@click.option("--experiment", default="main", show_default=True)
@click.option(
    "--sample",
    "sample_size",
    type=int,
    default=5000,
    show_default=True,
    help="Cells drawn from the unlabelled pool.",
)
@click.option("--cst-threshold", type=float, default=0.9, show_default=True)
@click.option("--al-margin", type=float, default=0.2, show_default=True)
@click.option(
    "--per-class-cap", type=int, default=0, help="Cap tasks per predicted class (0: off)."
)
@click.option("--scope", "labs", multiple=True, help="Labs in scope (repeat; default all).")
@click.option("--seed", type=int, default=None)
@click.option("--epochs", type=int, default=0, help="Training epochs (0: trainer default).")
@click.option(
    "--review-quorum",
    type=float,
    default=0.0,
    help="Train once this fraction of tasks is answered (0: all).",
)
@click.option(
    "--review-deadline",
    "review_deadline_s",
    type=int,
    default=0,
    help="Train after this many seconds of review (0: no deadline).",
)
@click.option(
    "--initial-per-class", type=int, default=0, help="Bootstrap: initial labels per class."
)
@click.option("--validation-per-class", type=int, default=0)
@click.option("--test-per-class", type=int, default=0)
@click.option("--initial-reviews", type=int, default=0, help="Bootstrap: agreeing reviews needed.")
@click.option("--test-reviews", type=int, default=0)
@click.option("--wave-size", type=int, default=0, help="Bootstrap: cells per labelling wave.")
@click.option("--max-waves", type=int, default=0, help="Bootstrap: at most this many waves.")
@click.option(
    "--gate",
    type=float,
    default=0.0,
    help="Bootstrap: validation accuracy the initial model needs (0: the study's 0.80).",
)
@click.option("--wait/--no-wait", default=False, help="Follow the round until it ends.")
@click.option("--json", "as_json", is_flag=True, help="Print the created round as JSON.")
def start(
    strategy: str,
    experiment: str,
    sample_size: int,
    cst_threshold: float,
    al_margin: float,
    per_class_cap: int,
    labs: tuple[str, ...],
    seed: int | None,
    epochs: int,
    review_quorum: float,
    review_deadline_s: int,
    initial_per_class: int,
    validation_per_class: int,
    test_per_class: int,
    initial_reviews: int,
    test_reviews: int,
    wave_size: int,
    max_waves: int,
    gate: float,
    wait: bool,
    as_json: bool,
) -> None:
    """Create the next round; the rounds service drives it to its end."""
    selection = selector_pb2.SelectionParameters(
        sample_size=sample_size,
        cst_threshold=cst_threshold,
        al_margin=al_margin,
        per_class_cap=per_class_cap,
        labs=list(labs),
    )
    if seed is not None:
        selection.seed = seed
    with rpc_errors():
        r = _stub().StartRound(
            rounds_pb2.StartRoundRequest(
                experiment=experiment,
                strategy=strategy,
                selection=selection,
                epochs=epochs,
                review_quorum=review_quorum,
                review_deadline_s=review_deadline_s,
                initial_per_class=initial_per_class,
                validation_per_class=validation_per_class,
                test_per_class=test_per_class,
                initial_reviews=initial_reviews,
                test_reviews=test_reviews,
                wave_size=wave_size,
                max_waves=max_waves,
                gate=gate,
            )
        )
    if as_json:
        click.echo(json.dumps(MessageToDict(r, preserving_proto_field_name=True)))
    else:
        click.echo(f"round {r.number} of {r.experiment!r} started (id {r.round_id}, {r.strategy})")
    if wait:
        r = follow(r.round_id)
        if as_json:
            click.echo(json.dumps(MessageToDict(r, preserving_proto_field_name=True)))


def follow(round_id: int, poll_s: float = 2.0) -> rounds_pb2.Round:
    """Print state changes, and each training epoch, until the round ends."""
    stub, last, last_epoch = _stub(), None, None
    console = Console(stderr=True)
    with rpc_errors(), console.status("waiting") as status:
        while True:
            r = stub.GetRound(rounds_pb2.GetRoundRequest(round_id=round_id))
            tasks = dict(r.tasks_by_state)
            line = (
                f"round {r.number}: {r.state}  tasks open {tasks.get('open', 0)} "
                f"leased {tasks.get('leased', 0)} done {tasks.get('done', 0)}"
            )
            status.update(line)
            if r.state != last:
                console.print(f"round {r.number}: {r.state} {r.message}")
                last = r.state
            epoch = (r.training.job_id, r.training.epoch)
            if r.training.epoch and epoch != last_epoch:
                console.print(f"round {r.number}: {progress_line(r.training)}")
            last_epoch = epoch
            if r.state in TERMINAL:
                if r.model_out:
                    console.print(f"round {r.number}: model v{r.model_out}: {figures(r)}")
                if r.short_classes:
                    console.print(f"round {r.number}: short of quota: {', '.join(r.short_classes)}")
                return r
            time.sleep(poll_s)


@round_group.command("status")
@click.option("--experiment", default="main", show_default=True)
@click.option("--round-id", type=int, default=0)
@click.option("--json", "as_json", is_flag=True)
def status(experiment: str, round_id: int, as_json: bool) -> None:
    """The latest round (or one round) with its task and label counts."""
    with rpc_errors():
        r = _stub().GetRound(rounds_pb2.GetRoundRequest(round_id=round_id, experiment=experiment))
    if as_json:
        click.echo(json.dumps(MessageToDict(r, preserving_proto_field_name=True), indent=2))
        return
    click.echo(f"round {r.number} of {r.experiment!r} ({r.strategy}): {r.state}")
    click.echo(f"  tasks: {dict(r.tasks_by_state)}")
    click.echo(f"  labels added: {r.labels_added}")
    if r.model_out:
        click.echo(f"  model v{r.model_out}: {figures(r)}")
    if r.short_classes:
        click.echo(f"  short of quota: {', '.join(r.short_classes)}")
    if r.message:
        click.echo(f"  {r.message}")
    if r.state == "failed":
        click.echo(
            f"  retry: bmcell round retry {r.round_id}"
            if r.failed_step
            else "  a retry cannot help: start a new round"
        )


def figures(r: rounds_pb2.Round) -> str:
    """Accuracy beside balanced accuracy and macro-F1, naming the test set."""
    line = f"validation {r.validation_accuracy:.3f}, test {r.test_accuracy:.3f}"
    if r.test_balanced_accuracy or r.test_macro_f1:
        line += f" (balanced {r.test_balanced_accuracy:.3f}, macro-F1 {r.test_macro_f1:.3f})"
    if r.test_set:
        line += f" on {r.test_set}"
    return line


@round_group.command("retry")
@click.argument("round_id", type=int)
@click.option("--wait/--no-wait", default=False, help="Follow the round until it ends.")
def retry(round_id: int, wait: bool) -> None:
    """Start failed round ROUND_ID again from the step that failed."""
    with rpc_errors():
        r = _stub().RetryRound(rounds_pb2.RetryRoundRequest(round_id=round_id))
    click.echo(f"round {r.number} of {r.experiment!r} (id {r.round_id}): {r.state} again")
    if wait:
        follow(r.round_id)


def history_rows(rounds: list[rounds_pb2.Round]) -> list[dict]:
    """Per round: accuracy and cumulative added labels (the study's Table 1 columns)."""
    rows, cumulative = [], 0
    for r in rounds:
        cumulative += r.labels_added if r.strategy != "bootstrap" else 0
        rows.append(
            {
                "experiment": r.experiment,
                "round": r.number,
                "strategy": r.strategy,
                "state": r.state,
                "model": r.model_out,
                "validation_accuracy": round(r.validation_accuracy, 4),
                "test_accuracy": round(r.test_accuracy, 4),
                "test_balanced_accuracy": round(r.test_balanced_accuracy, 4),
                "test_macro_f1": round(r.test_macro_f1, 4),
                "test_set": r.test_set,
                "added": r.labels_added,
                "cumulative_added": cumulative,
            }
        )
    return rows


@round_group.command("history")
@click.option("--experiment", default="main", show_default=True)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "md", "csv", "json"]),
    default="table",
    show_default=True,
)
def history(experiment: str, fmt: str) -> None:
    """Every round of an experiment: accuracy and cumulative added labels."""
    with rpc_errors():
        rounds = list(
            paging.follow(
                _stub().ListRounds, rounds_pb2.ListRoundsRequest(experiment=experiment), "rounds"
            )
        )
    rows = history_rows(rounds)
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
    elif fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["round"])
        writer.writeheader()
        writer.writerows(rows)
        click.echo(buf.getvalue(), nl=False)
    elif fmt == "md":
        cols = list(rows[0]) if rows else ["round"]
        click.echo("| " + " | ".join(cols) + " |")
        click.echo("|" + "---|" * len(cols))
        for row in rows:
            click.echo("| " + " | ".join(str(row[c]) for c in cols) + " |")
    else:
        table = Table(title=f"rounds of {experiment!r}")
        for col in (
            "round",
            "strategy",
            "state",
            "model",
            "validation_accuracy",
            "test_accuracy",
            "test_balanced_accuracy",
            "test_macro_f1",
            "added",
            "cumulative_added",
        ):
            table.add_column(col)
        for row in rows:
            table.add_row(
                *(
                    str(row[c])
                    for c in (
                        "round",
                        "strategy",
                        "state",
                        "model",
                        "validation_accuracy",
                        "test_accuracy",
                        "test_balanced_accuracy",
                        "test_macro_f1",
                        "added",
                        "cumulative_added",
                    )
                )
            )
        Console().print(table)
