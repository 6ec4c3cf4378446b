"""``bmcell demo``: a synthetic multi-lab run, end to end, on the embedded stack.

Three labs upload synthetic specimens at once; the segmenter cuts the cells; simulated
reviewers label the bootstrap set through the labeling API; the initial model is
trained on Ray and must pass the 0.80 validation gate; three CST+AL rounds follow;
a differential count is reported for one specimen. It prints what it does as it goes,
the round table at the end, and where the plots and reports are.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
from rich.console import Console

from bmcell import scenario
from bmcell.cli.rounds import history_rows
from bmcell.review_sim import TruthIndex
from bmcell.stack import Stack, StackConfig
from bmcell.stack.config import REPO, train_on_every_ray_cpu
from bmcell.studyreport import RoundResult, plot_figure1, table1_rows, write_table
from bmcell.v1 import rounds_pb2, selector_pb2

console = Console(stderr=True)


def say(msg: str) -> None:
    console.print(f"[bold cyan]demo[/] {msg}")


@click.command()
@click.option("--labs", default=3, show_default=True)
@click.option("--specimens", default=4, show_default=True, help="Per lab; one per lab is test.")
@click.option("--fields", default=16, show_default=True, help="Per specimen.")
@click.option("--size", default=704, show_default=True, help="Field size in pixels.")
@click.option("--rounds", "n_rounds", default=3, show_default=True, help="CST+AL rounds.")
@click.option(
    "--sample",
    default=300,
    show_default=True,
    help="Pool sample per round (about half of it becomes CST or AL tasks).",
)
@click.option(
    "--epochs",
    default=8,
    show_default=True,
    help="Training epochs of each CST+AL round (they start from the previous weights).",
)
@click.option(
    "--bootstrap-epochs",
    default=40,
    show_default=True,
    help="Training epochs of the initial model (from scratch).",
)
@click.option("--seed", default=0, show_default=True)
@click.option("--port-base", default=25600, show_default=True, help="The demo's stack ports.")
@click.option(
    "--out", type=click.Path(path_type=Path), default=REPO / ".run" / "demo", show_default=True
)
def demo(
    labs: int,
    specimens: int,
    fields: int,
    size: int,
    n_rounds: int,
    sample: int,
    epochs: int,
    bootstrap_epochs: int,
    seed: int,
    port_base: int,
    out: Path,
) -> None:
    """Run the study's procedure on synthetic specimens from several labs, end to end."""
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    # A stack of its own, started empty, so the demo's numbers never mix with a
    # developer's data on the default stack.
    cfg = StackConfig(run_dir=out / "stack", port_base=port_base)
    train_on_every_ray_cpu(cfg, os.environ)
    stack = Stack(cfg, progress=lambda m: say(f"stack: {m}"))
    stack.down()
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    say(
        f"starting an empty embedded stack on ports {port_base}+ "
        "(Postgres, S3 server, Triton, Ray, services)"
    )
    stack.up()
    os.environ.update(stack.env())
    env = stack.env()
    experiment = f"demo-{int(time.time())}"

    manifest = scenario.synthesize(out / "synth", labs, specimens, fields, seed, size, say)
    say("the stack's admin makes operator 'demo-operator' (labeling API /v1/users)")
    admin = stack.admin_token()
    token = scenario.person_token(env["BMCELL_LABELAPI_URL"], admin, "demo-operator")
    test_specimens = scenario.upload(manifest, say, token, test_per_lab=1)
    truth = TruthIndex.from_manifest(
        manifest, scenario.segmenter_cells(env["BMCELL_SEGMENTER_ADDR"], token)
    )
    reviewers = scenario.Reviewers(count=4, error_rate=0.02, difficult_rate=0.01, seed=seed)
    common = {
        "token": token,
        "labelapi_url": env["BMCELL_LABELAPI_URL"],
        "admin_token": admin,
        "truth": truth,
        "reviewers": reviewers,
        "say": say,
    }

    say("bootstrap: reviewers label random cells until every class has its quota")
    boot, _ = scenario.bootstrap(
        env["BMCELL_ROUNDS_ADDR"],
        rounds_pb2.StartRoundRequest(
            experiment=experiment,
            strategy="bootstrap",
            epochs=bootstrap_epochs,
            initial_per_class=10,
            validation_per_class=5,
            test_per_class=5,
            initial_reviews=1,
            test_reviews=2,
            wave_size=240,
            max_waves=3,
            selection=selector_pb2.SelectionParameters(seed=seed + 1),
        ),
        **common,
    )
    if boot.state != "published":
        raise click.ClickException(f"bootstrap ended {boot.state}: {boot.message}")
    rounds = [boot]
    for i in range(n_rounds):
        r, _ = scenario.run_round(
            env["BMCELL_ROUNDS_ADDR"],
            rounds_pb2.StartRoundRequest(
                experiment=experiment,
                strategy="cst+al",
                epochs=epochs,
                selection=selector_pb2.SelectionParameters(sample_size=sample, seed=seed + i + 1),
            ),
            **common,
        )
        rounds.append(r)
        if r.state != "published":
            raise click.ClickException(f"round {r.number} ended {r.state}: {r.message}")

    rows = history_rows(rounds)
    results = [
        RoundResult(
            round=r.number,
            test_accuracy=r.test_accuracy,
            validation_accuracy=r.validation_accuracy,
            added=0 if r.strategy == "bootstrap" else r.labels_added,
            added_by_class=dict(r.labels_added_by_class),
        )
        for r in rounds
    ]
    write_table(table1_rows({"cst+al": results}), out, "rounds")
    plot_figure1({"cst+al": results}, out / "rounds.png")

    specimen = next(s for s in manifest.specimens if s.id not in test_specimens)
    say(f"differential count of {specimen.lab}/{specimen.id} with the active model")
    # Through the labeling API with the stack's operator token, as a lab would.
    for fmt in ("json", "html"):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "bmcell.cli.main",
                "report",
                specimen.lab,
                specimen.id,
                *(["--json"] if fmt == "json" else []),
                "--out",
                str(out / f"report-{specimen.id}.{fmt}"),
            ],
            env={**os.environ, "BMCELL_TOKEN": token},  # not on the command line
            check=True,
        )
    rep = json.loads((out / f"report-{specimen.id}.json").read_text())

    test_set = next((r.test_set for r in reversed(rounds) if r.test_set), "the test specimens")
    click.echo(f"\ntest accuracy on {test_set}; balanced = mean of per-class recalls")
    click.echo(
        "round | strategy  | state     | model | val acc | test acc | balanced | macro-F1 "
        "| added | cumulative"
    )
    for row in rows:
        click.echo(
            f"{row['round']:>5} | {row['strategy']:<9} | {row['state']:<9} | "
            f"v{row['model']:<4} | {row['validation_accuracy']:.3f}   | "
            f"{row['test_accuracy']:.3f}    | {row['test_balanced_accuracy']:.3f}    | "
            f"{row['test_macro_f1']:.3f}    | {row['added']:>5} | {row['cumulative_added']}"
        )
    click.echo(f"\ndifferential count of {specimen.lab}/{specimen.id}:")
    click.echo(
        json.dumps({k: rep[k] for k in rep if k not in ("low_confidence",)}, indent=1)[:3000]
    )
    click.echo(f"\noutputs in {out}: rounds.md, rounds.png, report-{specimen.id}.html/.json")
    click.echo(
        f"finished in {(time.monotonic() - started) / 60:.1f} min. The demo's stack "
        f"keeps running; to use it: export BMCELL_STACK_RUN_DIR={cfg.run_dir} "
        f"BMCELL_STACK_PORT_BASE={port_base}, then e.g. `bmcell round history "
        f"--experiment {experiment}` or, after `export BMCELL_TOKEN=$(bmcell users token "
        f"demo-operator)`, `bmcell cells --specimen {specimen.id}`; `bmcell stack down` stops it"
    )
