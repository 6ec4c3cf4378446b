"""Page tokens for every list call: keyset pagination, the same way everywhere.

A list call takes ``page_size`` (0: the server's ``BMCELL_MAX_PAGE_SIZE``) and
``page_token`` (empty: from the start) and answers ``next_page_token`` (empty: that
was the last page). A token is the sort key of the last row sent, so a page costs
an index range scan however deep it is, and rows inserted meanwhile are neither
skipped nor repeated. Tokens are opaque to clients: base64 of the list's name and
the key, checked on the way back in.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from bmcell.errors import InvalidArgument

T = TypeVar("T")


def page_size(requested: int, maximum: int, *, field: str = "page_size") -> int:
    if requested < 0:
        raise InvalidArgument(f"must be >= 0, got {requested}", field=field)
    if requested > maximum:
        raise InvalidArgument(
            f"{requested} is over the limit of {maximum} rows per page (BMCELL_MAX_PAGE_SIZE)",
            field=field,
        )
    return requested or maximum


def decode(kind: str, token: str, types: tuple[type, ...] = (int,)) -> list[Any] | None:
    """The key after which the page starts (one value of each of ``types``), or None for
    the first page."""
    if not token:
        return None
    try:
        raw = json.loads(base64.urlsafe_b64decode(token.encode("ascii") + b"=" * (-len(token) % 4)))
    except (ValueError, UnicodeError, binascii.Error):
        raw = None
    if not (
        isinstance(raw, list)
        and len(raw) == 2
        and raw[0] == kind
        and isinstance(raw[1], list)
        and len(raw[1]) == len(types)
        and all(type(v) is t for v, t in zip(raw[1], types, strict=True))
    ):
        raise InvalidArgument(
            "not a page token of this list; pass back next_page_token", field="page_token"
        )
    return raw[1]


def encode(kind: str, key: Sequence[Any]) -> str:
    data = json.dumps([kind, list(key)], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def next_token(kind: str, rows: list[T], size: int, key: Callable[[T], Sequence[Any]]) -> str:
    """Fetch ``size + 1`` rows; if the extra one came, there is a next page."""
    return encode(kind, key(rows[size - 1])) if len(rows) > size else ""


def follow(call: Callable[[Any], Any], request: Any, items: str) -> Iterator[Any]:
    """Every item of a list call, page after page: the client side of page tokens.

    ``call`` sends one request (a stub method, with its metadata and timeout bound);
    ``items`` names the response's repeated field. ``request`` is not changed.
    """
    page = type(request)()
    page.CopyFrom(request)
    while True:
        response = call(page)
        yield from getattr(response, items)
        if not response.next_page_token:
            return
        page.page_token = response.next_page_token
