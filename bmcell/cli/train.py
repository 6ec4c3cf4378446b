"""``bmcell train`` and ``bmcell models show``: the trainer service.

Both talk to the trainer at ``BMCELL_TRAINER_ADDR`` (the embedded stack's env file
supplies it). ``train`` starts (or rejoins) the round's training job and follows it
with a progress bar fed by WatchJob; interrupting the command leaves the job
running. ``models show`` prints a version's evaluation.
"""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bmcell.cli.common import channel, rpc_errors
from bmcell.v1 import trainer_pb2, trainer_pb2_grpc

ADDR_VAR = "BMCELL_TRAINER_ADDR"
#: WatchJob streams for the whole job: hours at the study's 250 epochs.
WATCH_TIMEOUT_S = 7 * 24 * 3600.0


@click.command()
@click.option("--round", "round_id", type=click.IntRange(min=1), required=True, help="Round id.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Ray workers.")
@click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True), default=None)
@click.option("--epochs", type=click.IntRange(min=1), default=None)
@click.option("--detach", is_flag=True, help="Start the job and return without following it.")
def train(
    round_id: int,
    workers: int | None,
    cpus_per_worker: float | None,
    epochs: int | None,
    detach: bool,
) -> None:
    """Train the round's model on Ray, evaluate it and publish it if it passes the gate."""
    request = trainer_pb2.StartTrainingRequest(
        round_id=round_id,
        epochs=epochs or 0,
        num_workers=workers or 0,
        cpus_per_worker=cpus_per_worker or 0.0,
    )
    console = Console(stderr=True)
    with rpc_errors(), channel(ADDR_VAR, WATCH_TIMEOUT_S) as ch:
        stub = trainer_pb2_grpc.TrainerStub(ch)
        job = stub.StartTraining(request, timeout=60)
        console.print(f"training job {job.job_id} for round {round_id} ({job.state})")
        if detach:
            return
        columns = (
            TextColumn("epoch"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
        )
        last = None
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("train", total=job.epochs, status=job.state)
            for last in stub.WatchJob(trainer_pb2.GetJobRequest(job_id=job.job_id)):
                status = (
                    f"loss {last.loss:.3f} train {last.train_accuracy:.3f} "
                    f"val {last.validation_accuracy:.3f} {last.samples_per_second:.0f}/s "
                    f"{last.epoch_seconds:.1f} s/epoch"
                    if last.epoch
                    else last.state
                )
                progress.update(task, completed=last.epoch, total=last.epochs, status=status)
        final = stub.GetJob(trainer_pb2.GetJobRequest(job_id=job.job_id), timeout=30)
    click.echo(f"{final.state}: {final.message}")
    if final.model_version:
        click.echo(
            f"model version {final.model_version}: validation {final.validation_accuracy:.4f}, "
            f"test {final.test_accuracy:.4f}, published {'yes' if final.published else 'no'}"
        )
    if final.state != "succeeded":
        sys.exit(1)


@click.command()
@click.argument("version", type=click.IntRange(min=0))
@click.option("--json", "as_json", is_flag=True, help="Print the stored metrics as JSON.")
def show(version: int, as_json: bool) -> None:
    """VERSION's evaluation (0: the active one) and its confusion matrix's object key."""
    with rpc_errors(), channel(ADDR_VAR, 30.0) as ch:
        report = trainer_pb2_grpc.TrainerStub(ch).GetModelReport(
            trainer_pb2.GetModelReportRequest(version=version)
        )
    metrics = json.loads(report.metrics_json or "{}")
    if as_json:
        click.echo(json.dumps({"version": report.version, "state": report.state, **metrics}))
        return
    click.echo(f"{report.model_name} v{report.version} ({report.state}) {report.note}")
    click.echo(f"confusion matrix: {report.confusion_key or '-'}")
    click.echo(f"test set: {report.test_set or '-'}")
    for split in ("validation", "test"):
        ev = metrics.get(split)
        if not ev:
            continue
        balanced = getattr(report, f"{split}_balanced_accuracy")
        macro_f1 = getattr(report, f"{split}_macro_f1")
        table = Table(
            title=f"{split}: accuracy {ev['accuracy']:.4f}, balanced accuracy {balanced:.4f}, "
            f"macro-F1 {macro_f1:.4f}, n = {ev['n']}"
        )
        for col in ("class", "recall", "precision", "F1"):
            table.add_column(col)
        f1 = ev.get("f1") or {}  # absent in versions registered before F1 was stored
        for code in ev["codes"]:
            table.add_row(
                code,
                _ratio(ev["recall"][code]),
                _ratio(ev["precision"][code]),
                _ratio(f1.get(code)),
            )
        table.add_row(
            "mean",
            _ratio(ev["mean_recall"]),
            _ratio(ev["mean_precision"]),
            _ratio(ev.get("macro_f1")),
        )
        Console(width=None if sys.stdout.isatty() else 120).print(table)


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def register(cli: click.Group) -> None:
    """Add ``train`` to the CLI and ``show`` to its ``models`` group."""
    cli.add_command(train)
    models = cli.commands.get("models")
    if isinstance(models, click.Group):
        models.add_command(show)
    else:
        cli.add_command(click.Group("models", commands={"show": show}))
