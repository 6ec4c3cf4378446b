"""``bmcell labs add | list`` and ``bmcell specimens list | set-role``: labs and
specimens as managed resources, through the labeling API (``BMCELL_LABELAPI_URL``)
with the caller's token (``BMCELL_TOKEN``; an operator's or admin's to change
anything). Every change is audited with the caller (``bmcell audit --entity lab:CODE``,
``--entity specimen:LAB/CODE``).
"""

from __future__ import annotations

import json

import click

from bmcell.cli.common import api_call, labelapi

ROLES = ("training", "test", "excluded")


def _print_json(value: object) -> None:
    click.echo(json.dumps(value, indent=1))


@click.group()
def labs() -> None:
    """Labs: the hospitals (or sites) whose specimens and people bmcell keeps apart."""


@labs.command("add")
@click.argument("code")
@click.option("--name", default="", help="The lab's name in full.")
@click.option("--json", "as_json", is_flag=True, help="Print the new lab as JSON.")
def labs_add(code: str, name: str, as_json: bool) -> None:
    """Create lab CODE (operators and admins)."""
    with labelapi() as client:
        lab = api_call(client, "POST", "/v1/labs", json={"code": code, "name": name})
    if as_json:
        _print_json(lab)
    else:
        click.echo(f"lab {lab['code']!r} added", err=True)


@labs.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def labs_list(as_json: bool) -> None:
    """Labs you see, with their specimen counts."""
    with labelapi() as client:
        found = api_call(client, "GET", "/v1/labs")["labs"]
    if as_json:
        _print_json(found)
        return
    for lab in found:
        click.echo(f"{lab['code']}\t{lab['specimens']} specimen(s)\t{lab['name']}")


@click.group()
def specimens() -> None:
    """Specimens and their roles: training, test (held out) or excluded."""


@specimens.command("list")
@click.option("--lab", default=None, help="Only this lab's specimens.")
@click.option("--role", type=click.Choice(ROLES), default=None, help="Only this role.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def specimens_list(lab: str | None, role: str | None, as_json: bool) -> None:
    """Specimens you see, with role, fields and cells."""
    params = {k: v for k, v in (("lab", lab), ("role", role)) if v}
    with labelapi() as client:
        found = api_call(client, "GET", "/v1/specimens", params=params)["specimens"]
    if as_json:
        _print_json(found)
        return
    for s in found:
        click.echo(
            f"{s['lab']}\t{s['code']}\t{s['role']}\t{s['fields']} field(s)\t{s['cells']} cell(s)"
            + (f"\t{s['diagnosis']}" if s["diagnosis"] else "")
        )


@specimens.command("set-role")
@click.argument("lab")
@click.argument("specimen")
@click.argument("role", type=click.Choice(ROLES))
@click.option(
    "--force",
    is_flag=True,
    help="Change it even when its cells are already in a training set or a test split "
    "(their labels that the new role does not allow are withdrawn).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")
def specimens_set_role(lab: str, specimen: str, role: str, force: bool, as_json: bool) -> None:
    """Make SPECIMEN of LAB a training, test or excluded specimen (operators, admins)."""
    with labelapi() as client:
        out = api_call(
            client,
            "PUT",
            f"/v1/specimens/{lab}/{specimen}/role",
            json={"role": role, "force": force},
        )
    if as_json:
        _print_json(out)
        return
    if not out["changed"]:
        click.echo(f"specimen {lab}/{specimen} already is a {role} specimen", err=True)
        return
    gone = out["invalidated"]
    click.echo(f"specimen {lab}/{specimen} is now a {role} specimen", err=True)
    if any(gone.values()):
        versions = ", ".join(map(str, gone["model_versions"])) or "none"
        click.echo(
            f"invalidated: {gone['training_labels']} training, {gone['validation_labels']} "
            f"validation and {gone['test_labels']} test label(s) ({gone['labels_withdrawn']} "
            f"withdrawn); model versions trained on its cells: {versions}; open review "
            f"tasks cancelled: {gone['open_tasks_cancelled']}",
            err=True,
        )
