"""A field's scale (µm per pixel) travels from the upload header to the ingestor,
optional, and a value that is no scale is refused naming the field."""

from __future__ import annotations

import pytest

from bmcell.errors import InvalidArgument
from bmcell.v1 import segmenter_pb2
from services.segmenter.ingest import UploadHeader, check_header
from services.segmenter.server import upload_header


def test_scale_is_optional_and_carried() -> None:
    unknown = upload_header(segmenter_pb2.UploadHeader(lab="lab-a", specimen="s1"))
    assert unknown.um_per_px is None
    known = upload_header(segmenter_pb2.UploadHeader(lab="lab-a", specimen="s1", um_per_px=0.25))
    assert known.um_per_px == pytest.approx(0.25)
    check_header(known)
    check_header(unknown)


@pytest.mark.parametrize("bad", [0.0, -1.0, 100.0, float("nan")])
def test_a_scale_that_is_none_is_refused(bad: float) -> None:
    with pytest.raises(InvalidArgument) as err:
        check_header(UploadHeader("lab-a", "s1", um_per_px=bad))
    assert err.value.field == "header.um_per_px"
