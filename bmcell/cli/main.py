"""Entry point of the ``bmcell`` command.

Commands that talk to the system read the same BMCELL_* variables as the services;
where one is unset, the embedded stack's ``.run/stack.env`` supplies it, so after
``bmcell stack up`` every command works with no configuration: the file carries an
operator's API token too (``BMCELL_TOKEN``; your own, or ``--token``, wins).
"""

from __future__ import annotations

import importlib
import os

import click

from bmcell import audit
from bmcell.cli.audit import audit_command
from bmcell.cli.datasets import export_command, import_command
from bmcell.cli.labs import labs, specimens
from bmcell.cli.models import classify, models
from bmcell.cli.report import report
from bmcell.cli.review import review
from bmcell.cli.rounds import round_group
from bmcell.cli.segmenter import register as register_segmenter
from bmcell.cli.stack import stack
from bmcell.cli.synth import synth
from bmcell.cli.train import register as register_train
from bmcell.cli.users import users
from bmcell.stack.config import StackConfig


def load_stack_env() -> None:
    env_file = StackConfig().env_file
    if not env_file.exists():
        return
    for line in env_file.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key not in os.environ:
            os.environ[key] = value


class LazyGroup(click.Group):
    """Commands named in ``lazy`` ("name" -> "module:attribute") are imported only when
    run (or listed by --help): the demo and the experiment pull in torch and scipy,
    seconds of start-up every other command should not pay."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and name not in self.commands:
            module, attr = self.lazy[name].split(":")
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)


@click.group(
    cls=LazyGroup,
    lazy={
        "demo": "bmcell.cli.demo:demo",
        "experiment": "bmcell.cli.experiment:experiment",
        "storage": "bmcell.cli.storage:storage",
    },
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(package_name="bmcell")
@click.option(
    "--token",
    default=None,
    help="Your API token for the services (default: BMCELL_TOKEN; `bmcell users token NAME`).",
)
def cli(token: str | None) -> None:
    """bmcell: grow a labelled bone marrow cell library and its classifier together."""
    if token:
        os.environ["BMCELL_TOKEN"] = token  # before the stack's env file can supply one
    load_stack_env()
    audit.set_process_identity(audit.cli_identity())


cli.add_command(stack)
cli.add_command(synth)
cli.add_command(round_group)
register_segmenter(cli)
cli.add_command(users)
cli.add_command(labs)
cli.add_command(specimens)
cli.add_command(audit_command)
cli.add_command(import_command)
cli.add_command(export_command)
cli.add_command(review)
cli.add_command(report)
cli.add_command(models)
cli.add_command(classify)
register_train(cli)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
