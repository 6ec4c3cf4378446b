"""``bmcell report LAB SPECIMEN``: a specimen's differential count from the labeling API.

Needs only the labeling API's URL (``--api``, default ``BMCELL_LABELAPI_URL``) and a
token (``--token``, default ``BMCELL_TOKEN``); the API's certificate is checked
against ``BMCELL_TLS_CA`` (bmcell.tls). No database or object storage is opened.

First ``POST .../predict``: the API has the classifier predict the specimen's cells
that have neither a reviewer's label nor a prediction of the active model version,
and streams progress, shown here on stderr. Then ``GET .../report`` as HTML
(``--out FILE.html``), JSON (``--json``) or, with neither, a table on stdout.
``--verify`` signs the count off (a reviewer's or admin's token) after reading it.
``bmcell report specimen LAB SPECIMEN`` (the old subcommand's name) still works.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import quote

import click
import httpx

from bmcell import report as rep
from bmcell import tls

URL_VAR = "BMCELL_LABELAPI_URL"
TOKEN_VAR = "BMCELL_TOKEN"


class ApiError(click.ClickException):
    """A refused call: the API's message, exit 1."""

    exit_code = 1


def _refusal(resp: httpx.Response) -> ApiError:
    try:
        message = resp.json().get("error") or resp.text
    except ValueError:
        message = resp.text
    return ApiError(f"{resp.status_code}: {message}")


def _show_progress(resp: httpx.Response) -> None:
    """Print the predict stream's lines as they come; an error line fails the command."""
    for line in resp.iter_lines():
        if not line.strip():
            continue
        msg = json.loads(line)
        if "to_predict" in msg:
            click.echo(
                f"{msg['lab']}/{msg['specimen']}: {msg['to_predict']} cell(s) to predict "
                f"with model version {msg['model_version']}",
                err=True,
            )
        elif "error" in msg:
            raise ApiError(f"prediction failed: {msg['error']}")
        elif msg.get("finished"):
            click.echo(f"predicted {msg['predicted']} cell(s)", err=True)
        else:
            click.echo(f"  {msg['done']}/{msg['total']} cells", err=True)


@click.command()
@click.argument("names", nargs=-1, required=True, metavar="[specimen] LAB SPECIMEN")
@click.option("--api", envvar=URL_VAR, help=f"Labeling API base URL (default: {URL_VAR}).")
@click.option("--token", "api_token", help=f"Your API token (default: {TOKEN_VAR}).")
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the report here."
)
@click.option("--json", "as_json", is_flag=True, help="JSON instead of HTML / the table.")
@click.option(
    "--min-confidence",
    default=rep.DEFAULT_MIN_CONFIDENCE,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Predicted cells below this top-1 probability are listed for review.",
)
@click.option(
    "--per-class",
    default=rep.DEFAULT_PER_CLASS,
    show_default=True,
    type=click.IntRange(0, 100),
    help="Gallery thumbnails per class in the HTML (0: none).",
)
@click.option("--verify", is_flag=True, help="Sign the count off (reviewer or admin).")
@click.option("--timeout", default=1800.0, show_default=True, type=click.FloatRange(min=1))
def report(
    names: tuple[str, ...],
    api: str | None,
    api_token: str | None,
    out: Path | None,
    as_json: bool,
    min_confidence: float,
    per_class: int,
    verify: bool,
    timeout: float,
) -> None:
    """A specimen's differential count through the labeling API, with your token."""
    if len(names) == 3 and names[0] == "specimen":
        names = names[1:]
    if len(names) != 2:
        raise click.UsageError("expected LAB SPECIMEN")
    lab, specimen = names
    token = api_token or os.environ.get(TOKEN_VAR)
    if not api:
        raise click.UsageError(f"no labeling API: pass --api or set {URL_VAR}")
    if not token:
        raise click.UsageError(f"no API token: pass --token or set {TOKEN_VAR}")
    base = f"{api.rstrip('/')}/v1/specimens/{quote(lab, safe='')}/{quote(specimen, safe='')}"
    fmt = "json" if as_json or out is None else "html"
    with httpx.Client(
        headers={"Authorization": f"Bearer {token}"},
        timeout=httpx.Timeout(timeout, connect=30),
        verify=tls.httpx_verify(),
    ) as client:
        try:
            with client.stream("POST", f"{base}/predict") as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise _refusal(resp)
                _show_progress(resp)
            params = {"format": fmt, "min_confidence": min_confidence, "per_class": per_class}
            resp = client.get(f"{base}/report", params=params)
            if resp.status_code != 200:
                raise _refusal(resp)
            if verify:
                digest = resp.json()["digest"] if fmt == "json" else None
                signed = client.post(f"{base}/report/verify", json={"digest": digest})
                if signed.status_code != 201:
                    raise _refusal(signed)
                s = signed.json()
                click.echo(f"verified by {s['verified_by']} at {s['verified_at']}", err=True)
                resp = client.get(f"{base}/report", params=params)  # now with the sign-off
                if resp.status_code != 200:
                    raise _refusal(resp)
        except httpx.HTTPError as exc:
            raise ApiError(f"labeling API at {api} unreachable: {exc}") from exc
    if fmt == "html":
        text = resp.text
    elif as_json:
        text = json.dumps(resp.json(), indent=1)
    else:
        text = rep.to_text(resp.json())
    if out is None:
        click.echo(text)
    else:
        out.write_text(text + ("" if text.endswith("\n") else "\n"))
        click.echo(f"wrote {out}", err=True)
