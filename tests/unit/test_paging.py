"""Page tokens (bmcell.paging): round trips, refusals that name the field, following."""

from __future__ import annotations

import pytest

from bmcell import paging
from bmcell.errors import InvalidArgument
from bmcell.v1 import segmenter_pb2


def test_tokens_round_trip_and_refuse_anything_else() -> None:
    token = paging.encode("rounds", ["exp-a", 7])
    assert paging.decode("rounds", token, (str, int)) == ["exp-a", 7]
    assert paging.decode("rounds", "", (str, int)) is None
    for bad, kind, types in [
        (token, "cells", (int,)),  # another list's token
        (token, "rounds", (int,)),  # the wrong key shape
        (paging.encode("cells", [True]), "cells", (int,)),
        ("not base64 at all!", "cells", (int,)),
        (paging.encode("cells", ["1"]), "cells", (int,)),
    ]:
        with pytest.raises(InvalidArgument) as err:
            paging.decode(kind, bad, types)
        assert err.value.field == "page_token"


def test_page_size_defaults_and_names_the_limit() -> None:
    assert paging.page_size(0, 1000) == 1000
    assert paging.page_size(5, 1000) == 5
    with pytest.raises(
        InvalidArgument, match=r"1001 is over the limit of 1000.*BMCELL_MAX_PAGE_SIZE"
    ):
        paging.page_size(1001, 1000)
    with pytest.raises(InvalidArgument, match=">= 0"):
        paging.page_size(-1, 1000)


def test_follow_reads_every_page_and_leaves_the_request_alone() -> None:
    ids = list(range(1, 8))
    seen_tokens = []

    def call(req: segmenter_pb2.ListCellsRequest) -> segmenter_pb2.ListCellsResponse:
        seen_tokens.append(req.page_token)
        after = (paging.decode("cells", req.page_token) or [0])[0]
        rows = [i for i in ids if i > after][: req.page_size + 1]
        return segmenter_pb2.ListCellsResponse(
            cells=[{"cell_id": i} for i in rows[: req.page_size]],
            next_page_token=paging.next_token("cells", rows, req.page_size, lambda i: [i]),
        )

    request = segmenter_pb2.ListCellsRequest(lab="x", page_size=3)
    got = [c.cell_id for c in paging.follow(call, request, "cells")]
    assert got == ids and len(seen_tokens) == 3 and request.page_token == ""
