"""``bmcell stack up | down | status | logs``: the embedded stack on this machine."""

from __future__ import annotations

import json
import sys
import time

import click
from rich.console import Console
from rich.table import Table

from bmcell.errors import ConfigError
from bmcell.stack import Stack, StackConfig

console = Console(stderr=True)


def _stack(**overrides: object) -> Stack:
    cfg = StackConfig(**{k: v for k, v in overrides.items() if v is not None})
    return Stack(cfg, progress=lambda msg: console.print(f"[dim]stack[/] {msg}"))


@click.group()
def stack() -> None:
    """Run Postgres, the S3 server, Triton, Ray and the services on loopback."""


@stack.command()
@click.option(
    "--port-base", type=int, help="First port of the stack's range (BMCELL_STACK_PORT_BASE)."
)
@click.option(
    "--with-prometheus", is_flag=True, default=None, help="Also run Prometheus scraping the stack."
)
def up(port_base: int | None, with_prometheus: bool | None) -> None:
    """Start everything (idempotent) and wait until each part is healthy."""
    s = _stack(port_base=port_base, with_prometheus=with_prometheus)
    started = time.monotonic()
    try:
        statuses = s.up()
    except (ConfigError, RuntimeError) as exc:
        console.print(f"[red]stack up failed:[/] {exc}")
        sys.exit(1)
    _print_table(statuses)
    console.print(f"ready in {time.monotonic() - started:.1f}s; settings in {s.config.env_file}")


@stack.command()
def down() -> None:
    """Stop everything the stack started; no process or port is left behind."""
    _stack().down()
    console.print("stack stopped")


@stack.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(as_json: bool) -> None:
    """Show each component: process, health, where it listens."""
    statuses = _stack().status()
    if as_json:
        click.echo(json.dumps({s.name: s.to_json() for s in statuses}, indent=2))
    else:
        _print_table(statuses)
    sys.exit(0 if all(s.healthy for s in statuses) else 1)


@stack.command()
@click.argument("name", required=False)
@click.option("-n", "--lines", default=50, show_default=True)
def logs(name: str | None, lines: int) -> None:
    """Print the last lines of one component's log (all components without NAME)."""
    s = _stack()
    names = [name] if name else [c.name for c in s.components()]
    for n in names:
        try:
            path = s.log_path(n)
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="NAME") from exc
        click.echo(f"==> {path} <==")
        if path.exists():
            click.echo("\n".join(path.read_text(errors="replace").splitlines()[-lines:]))


def _print_table(statuses) -> None:
    table = Table(title="bmcell embedded stack")
    for col in ("component", "pid", "healthy", "listens"):
        table.add_column(col)
    for s in statuses:
        mark = (
            "[green]yes[/]" if s.healthy else ("[yellow]starting[/]" if s.running else "[red]no[/]")
        )
        table.add_row(s.name, str(s.pid or "-"), mark, s.endpoint)
    Console().print(table)
