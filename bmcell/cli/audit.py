"""``bmcell audit``: read the audit trail, newest first.

Talks to Postgres directly, like ``bmcell users`` (BMCELL_DATABASE_URL; the embedded
stack's env file supplies it). Filters combine: ``--entity cell:123 --since
2026-12-01T00:00`` is that cell's changes since then.
"""

from __future__ import annotations

import json
from datetime import datetime

import click

from bmcell import audit as repo
from bmcell.cli.common import in_database
from bmcell.errors import InvalidArgument


def _parsed(parse):
    """A click callback running ``parse``; its InvalidArgument becomes a usage error."""

    def callback(_ctx: click.Context, _param: click.Parameter, value: str | None):
        if value is None:
            return None
        try:
            return parse(value)
        except InvalidArgument as exc:
            raise click.BadParameter(exc.message) from None

    return callback


def _line(row: dict) -> str:
    change = {k: row[k] for k in ("before", "after", "detail") if row[k] is not None}
    who = row["actor_name"] + (f" ({row['actor_role']})" if row["actor_role"] else "")
    return "\t".join(
        (
            row["at"].isoformat(timespec="seconds"),
            who,
            row["action"],
            f"{row['entity']}:{row['entity_id']}",
            json.dumps(change, sort_keys=True, default=str) if change else "",
        )
    )


def _json(row: dict) -> dict:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}


@click.command("audit")
@click.option(
    "--entity",
    callback=_parsed(repo.parse_entity),
    help="ENTITY:ID (cell:123, round:4, user:ana) or a bare ENTITY.",
)
@click.option("--actor", help="Who acted, as recorded: a user name or service:<name>.")
@click.option(
    "--since",
    callback=_parsed(repo.parse_since),
    help="From this time on, ISO 8601 (UTC without an offset).",
)
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, repo.MAX_LIMIT))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def audit_command(
    entity: tuple[str, str | None] | None,
    actor: str | None,
    since: datetime | None,
    limit: int,
    as_json: bool,
) -> None:
    """Who changed what and when: the append-only audit trail, newest first."""
    entity_name, entity_id = entity or (None, None)
    rows = in_database(
        lambda conn: repo.search(
            conn,
            entity=entity_name,
            entity_id=entity_id,
            actor=actor,
            since=since,
            limit=limit,
        ),
        name="bmcell-audit",
    )
    for row in rows:
        click.echo(json.dumps(_json(row), default=str) if as_json else _line(row))
    if not rows:
        click.echo("no audit rows match", err=True)
