"""``bmcell storage check [--repair]``: do Postgres and object storage agree?

Reads BMCELL_DATABASE_URL and BMCELL_S3_* (the embedded stack's env file supplies
them). Lists objects no row uses (orphans) and rows whose object is gone (missing);
``--repair`` deletes orphans older than ``--grace-s`` and cuts lost crops and masks
again from their fields (see :mod:`bmcell.integrity`), then checks once more. The
exit status is 0 when no problem remains, 1 otherwise.
"""

from __future__ import annotations

import json
import sys

import click

from bmcell import integrity
from bmcell.db import Database, migrate
from bmcell.errors import BmcellError
from bmcell.settings import SegmenterSettings, load
from bmcell.storage import ObjectStore


@click.group()
def storage() -> None:
    """Object storage against the rows that point at it."""


@storage.command()
@click.option("--repair", is_flag=True, help="Delete old orphans, restore lost crops and masks.")
@click.option(
    "--grace-s",
    type=click.FloatRange(min=0),
    default=integrity.DEFAULT_GRACE_S,
    show_default=True,
    help="Orphans written more recently than this are left alone (an upload in flight).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def check(repair: bool, grace_s: float, as_json: bool) -> None:
    """List orphans and missing objects; with --repair, fix what can be fixed."""
    try:
        settings = load(SegmenterSettings)
        migrate(settings.database_url)
        db = Database(settings, name="bmcell-storage").open()
    except BmcellError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    store = ObjectStore(settings)
    try:
        found = integrity.check(db, store)
        out: dict = {"check": found.to_json()}
        if not as_json:
            _print_check(found, "found")
        if repair:
            from services.segmenter.restore import recutter  # the segmenter's own cutting

            fixed = integrity.repair(
                db, store, found, recut=recutter(store, settings.crop_size), grace_s=grace_s
            )
            found = integrity.check(db, store)
            out.update(repair=fixed.to_json(), after=found.to_json())
            if not as_json:
                _print_repair(fixed)
                _print_check(found, "remaining")
    except BmcellError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    finally:
        db.close()
    if as_json:
        click.echo(json.dumps(out, indent=2))
    sys.exit(1 if found.findings else 0)


def _print_check(report: integrity.CheckReport, label: str) -> None:
    click.echo(f"{label}: {len(report.orphans)} orphaned, {len(report.missing)} missing")
    for f in report.findings:
        why = f" (needed by {f.row})" if f.row else ""
        click.echo(f"  {f.problem:7} {f.kind:11} {f.bucket}/{f.key}{why}")


def _print_repair(fixed: integrity.RepairReport) -> None:
    click.echo(
        f"repair: {len(fixed.deleted)} orphans deleted, {len(fixed.restored)} objects restored, "
        f"{len(fixed.too_young)} orphans younger than the grace period kept"
    )
    for f, action in fixed.unrepaired:
        click.echo(f"  cannot restore {f.bucket}/{f.key}: {action}")
