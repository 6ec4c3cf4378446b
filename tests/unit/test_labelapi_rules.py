"""Labeling API rules that need no database: tokens, scope, answers, CSV."""

from __future__ import annotations

import hashlib
import io
from datetime import UTC, datetime

import numpy as np
import pytest
from PIL import Image

from bmcell import images
from bmcell.auth import PREFIX_LEN, Principal, bearer_token, new_token
from bmcell.errors import InvalidArgument, PermissionDenied, Unauthenticated
from bmcell.taxonomy import DEFAULT_TAXONOMY
from services.labelapi import field_context, labels, queue


def test_new_token_stores_only_a_hash_and_a_prefix() -> None:
    token, prefix, digest = new_token()
    assert token.startswith("bmc_") and len(token) > 40
    assert prefix == token[:PREFIX_LEN]
    assert digest == hashlib.sha256(token.encode()).digest() and len(digest) == 32
    assert new_token()[0] != token


@pytest.mark.parametrize(
    ("header", "problem"),
    [(None, "missing"), ("", "missing"), ("Basic x", "Bearer"), ("Bearer ", "Bearer")],
)
def test_bearer_header_problems_are_named(header: str | None, problem: str) -> None:
    with pytest.raises(Unauthenticated, match=problem):
        bearer_token(header)


def test_bearer_header_parsed() -> None:
    assert bearer_token("Bearer bmc_abc ") == "bmc_abc"


def test_scope_and_roles() -> None:
    reviewer = Principal(1, "ana", "reviewer", frozenset({3}))
    admin = Principal(2, "root", "admin", None)
    assert reviewer.sees_lab(3) and not reviewer.sees_lab(4)
    assert admin.sees_lab(4) and admin.all_labs
    with pytest.raises(PermissionDenied, match="'reviewer'"):
        reviewer.require("operator", "admin")


def _task(**kw: object) -> dict:
    return {"id": 5, "suggested_class": None, "top_classes": [], **kw}


def test_answer_class_rules() -> None:
    tax = DEFAULT_TAXONOMY
    assert queue._answer_class(_task(suggested_class="MB"), tax, "confirm", None) == "MB"
    assert queue._answer_class(_task(top_classes=["PMC", "MB"]), tax, "confirm", None) == "PMC"
    assert queue._answer_class(_task(), tax, "correct", "LY") == "LY"
    assert queue._answer_class(_task(), tax, "difficult", None) is None
    with pytest.raises(InvalidArgument, match="no suggestion") as exc:
        queue._answer_class(_task(), tax, "confirm", None)
    assert exc.value.field == "answer"
    with pytest.raises(InvalidArgument, match="unknown class 'XX'") as exc:
        queue._answer_class(_task(), tax, "correct", "XX")
    assert exc.value.field == "class_code"
    with pytest.raises(InvalidArgument, match="empty"):
        queue._answer_class(_task(), tax, "difficult", "LY")


def test_outcome_of_answers() -> None:
    def answers(*codes: str | None) -> list[dict]:
        return [{"class_code": c} for c in codes]

    assert queue._outcome_of(answers("LY", "LY", "LY")) == ("labelled", {"class_code": "LY"})
    assert queue._outcome_of(answers(None, None)) == ("difficult", {"class_code": "difficult"})
    assert queue._outcome_of(answers("LY", "MO", "LY")) == ("adjudication", {"LY": 2, "MO": 1})
    assert queue._outcome_of(answers("LY", None))[0] == "adjudication"


def test_csv_export_columns() -> None:
    row = dict.fromkeys(labels.EXPORT_COLUMNS, "x")
    row["updated_at"] = datetime(2025, 1, 2, tzinfo=UTC)
    text = labels.to_csv([row])
    header, line = text.strip().splitlines()
    assert header.split(",") == list(labels.EXPORT_COLUMNS)
    assert line.endswith("2025-01-02T00:00:00+00:00")


def test_field_window_is_centred_on_the_cell_and_kept_inside_the_field() -> None:
    assert field_context.window((100, 100, 150, 150), 128, 256, 256) == (61, 61, 189, 189)
    # Near an edge: moved inside, not padded.
    assert field_context.window((0, 240, 10, 256), 128, 256, 256) == (0, 128, 128, 256)
    # A field smaller than the window: the whole field.
    assert field_context.window((5, 5, 20, 20), 512, 300, 200) == (0, 0, 300, 200)


def test_field_outline_rings_the_box_and_is_clipped() -> None:
    rgb = np.zeros((40, 40, 3), np.uint8)
    field_context.outline(rgb, (10, 10, 20, 20))
    assert tuple(rgb[7, 15]) == (255, 220, 0) and tuple(rgb[6, 15]) == (0, 0, 0)
    assert tuple(rgb[15, 15]) == (0, 0, 0) and tuple(rgb[10, 10]) == (0, 0, 0)  # inside untouched
    edge = np.zeros((40, 40, 3), np.uint8)
    field_context.outline(edge, (0, 0, 40, 40))  # rings cut to the image's border
    assert tuple(edge[0, 5]) == (0, 0, 0) and tuple(edge[20, 20]) == (0, 0, 0)
    field_context.outline(edge, (2, 2, 38, 38))
    assert tuple(edge[0, 20]) == (0, 0, 0) and tuple(edge[1, 20]) == (0, 0, 0)


def test_field_render_of_a_field_smaller_than_the_window() -> None:
    field = np.full((60, 80, 3), 90, np.uint8)
    png, win = field_context.render(images.png_bytes(field), (30, 20, 40, 30), 512)
    assert win == (0, 0, 80, 60)
    out = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert out.shape == (60, 80, 3) and tuple(out[25, 35]) == (90, 90, 90)
    assert tuple(out[17, 35]) == (255, 220, 0)
