from __future__ import annotations

import pytest

from bmcell.errors import ConfigError, InvalidArgument, NotFound
from bmcell.settings import ClassifierSettings, SegmenterSettings, load


def test_missing_required_address_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BMCELL_DATABASE_URL", raising=False)
    monkeypatch.setenv("BMCELL_S3_ENDPOINT", "127.0.0.1:9000")
    with pytest.raises(ConfigError, match="BMCELL_DATABASE_URL is required"):
        load(SegmenterSettings)


def test_bad_value_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BMCELL_DATABASE_URL", "postgresql://x@127.0.0.1/db")
    monkeypatch.setenv("BMCELL_S3_ENDPOINT", "127.0.0.1:9000")
    monkeypatch.setenv("BMCELL_GRPC_PORT", "70000")
    monkeypatch.setenv("BMCELL_TRITON_URL", "127.0.0.1:8001")
    with pytest.raises(ConfigError, match="BMCELL_GRPC_PORT"):
        load(ClassifierSettings)


def test_defaults_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BMCELL_DATABASE_URL", "postgresql://x@127.0.0.1/db")
    monkeypatch.setenv("BMCELL_S3_ENDPOINT", "127.0.0.1:9000")
    monkeypatch.setenv("BMCELL_MAX_UPLOAD_BYTES", "2048")
    s = load(SegmenterSettings)
    assert s.max_upload_bytes == 2048
    assert s.grpc_port == 50051
    assert s.s3_secret_key.get_secret_value()  # secret, but present
    assert "bmcell-secret" not in repr(s)


def test_errors_carry_statuses() -> None:
    err = InvalidArgument("must be PNG, JPEG or TIFF", field="chunk")
    assert (err.grpc_code, err.http_status) == ("INVALID_ARGUMENT", 400)
    assert str(err) == "chunk: must be PNG, JPEG or TIFF"
    assert (NotFound("x").grpc_code, NotFound("x").http_status) == ("NOT_FOUND", 404)
