"""``bmcell experiment``: compare strategies from the same start on the same pool."""

from __future__ import annotations

import os
import time
from pathlib import Path

import click
from rich.console import Console

from bmcell import experiment as exp
from bmcell.scenario import Reviewers
from bmcell.selection import STRATEGIES
from bmcell.stack import Stack, StackConfig
from bmcell.stack.config import REPO, train_on_every_ray_cpu

console = Console(stderr=True)


@click.command()
@click.option(
    "--strategies",
    default="cst,al,cst+al",
    show_default=True,
    help="Comma-separated: cst, al, cst+al, st, random, least_confidence, entropy.",
)
@click.option("--rounds", "n_rounds", default=8, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--labs", default=3, show_default=True)
@click.option("--specimens", default=4, show_default=True)
@click.option("--fields", default=12, show_default=True)
@click.option("--sample", default=1000, show_default=True, help="Pool sample per round.")
@click.option("--epochs", default=0, help="Training epochs per round (0: trainer default).")
@click.option(
    "--bootstrap-epochs",
    default=0,
    help="Training epochs of the initial model (0: trainer default).",
)
@click.option(
    "--initial-per-class",
    default=25,
    show_default=True,
    help="Bootstrap: initial labels per class (the study's 25).",
)
@click.option("--error-rate", default=0.02, show_default=True)
@click.option("--difficult-rate", default=0.01, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--port-base",
    default=24400,
    show_default=True,
    help="The experiment runs its own embedded stack on this port range.",
)
def experiment(
    strategies: str,
    n_rounds: int,
    out: Path,
    labs: int,
    specimens: int,
    fields: int,
    sample: int,
    epochs: int,
    bootstrap_epochs: int,
    initial_per_class: int,
    error_rate: float,
    difficult_rate: float,
    seed: int,
    port_base: int,
) -> None:
    """Run the study's comparison and write Table 1, Figure 1, confusion matrices,
    human effort, ANOVA/Tukey statistics and the seconds per stage to OUT.

    Stopped runs resume: run the same command again (same OUT, same --port-base) and
    it reuses the fields, the uploads and the bootstrap, skips finished strategies
    and carries on with the round that was live."""
    chosen = [s.strip() for s in strategies.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STRATEGIES]
    if unknown or not chosen:
        raise click.BadParameter(
            f"unknown {unknown}; expected some of {list(STRATEGIES)}", param_hint="--strategies"
        )
    started = time.monotonic()
    say = lambda msg: console.print(f"[bold magenta]experiment[/] {msg}")  # noqa: E731
    stack_cfg = StackConfig(run_dir=REPO / ".run" / f"experiment-{port_base}", port_base=port_base)
    train_on_every_ray_cpu(stack_cfg, os.environ)
    stack = Stack(stack_cfg, progress=lambda m: say(f"stack: {m}"))
    cfg = exp.ExperimentConfig(
        strategies=chosen,
        rounds=n_rounds,
        out=out,
        labs=labs,
        specimens=specimens,
        fields=fields,
        sample=sample,
        epochs=epochs,
        bootstrap_epochs=bootstrap_epochs,
        seed=seed,
        reviewers=Reviewers(
            count=4, error_rate=error_rate, difficult_rate=difficult_rate, seed=seed
        ),
    )
    cfg.bootstrap["initial_per_class"] = initial_per_class
    try:
        written = exp.run(cfg, stack, say)
    except exp.ExperimentError as err:
        raise click.ClickException(str(err)) from err
    click.echo((out / "table1.md").read_text())
    for name, path in sorted(written.items()):
        click.echo(f"  {name}: {path}")
    click.echo(f"finished in {(time.monotonic() - started) / 60:.1f} min")
