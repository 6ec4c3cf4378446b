"""The audit trail's pure parts: who acts, the ``bmcell audit`` filters and their errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner

from bmcell import audit
from bmcell.auth import Principal, acting_as
from bmcell.cli.main import cli
from bmcell.errors import InvalidArgument


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("cell:123", ("cell", "123")),
        ("model_version:bmcell-cell/3", ("model_version", "bmcell-cell/3")),
        ("user:ana:2", ("user", "ana:2")),
        ("round", ("round", None)),
    ],
)
def test_entity_parses(text: str, parsed: tuple[str, str | None]) -> None:
    assert audit.parse_entity(text) == parsed


@pytest.mark.parametrize("text", ["", "cell:", ":123", "Cell:1", "cell 1:2", "c" * 64 + ":1"])
def test_malformed_entity_names_the_field(text: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        audit.parse_entity(text)
    assert err.value.field == "entity" and "ENTITY:ID" in err.value.message


def test_since_without_offset_is_utc_and_offsets_are_kept() -> None:
    assert audit.parse_since("2026-12-01T00:00") == datetime(2026, 12, 1, tzinfo=UTC)
    assert audit.parse_since("2026-12-01") == datetime(2026, 12, 1, tzinfo=UTC)
    plus_one = audit.parse_since("2026-12-01T00:00+01:00")
    assert plus_one.utcoffset() == timedelta(hours=1)
    assert plus_one == datetime(2026, 11, 30, 23, tzinfo=UTC)


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01", "2026-12-01T25:00", "12/01/2026"])
def test_malformed_since_names_the_field(text: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        audit.parse_since(text)
    assert err.value.field == "since" and "ISO 8601" in err.value.message


def test_actor_is_the_caller_else_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "_process", audit._process)  # restored after the test
    audit.set_process_identity("rounds")
    assert audit.acting() == audit.Actor("process", "service:rounds")
    person = Principal(7, "ana", "reviewer", frozenset({1}))
    service = Principal(9, "svc-trainer", "service", None)
    with acting_as(person):
        assert audit.acting() == audit.Actor("person", "ana", 7, "reviewer")
        with acting_as(service):
            assert audit.acting() == audit.Actor("service", "svc-trainer", 9, "service")
        assert audit.acting().name == "ana"
    assert audit.acting().name == "service:rounds"
    audit.set_process_identity("cli:ops")
    assert audit.acting() == audit.Actor("process", "cli:ops")


@pytest.mark.parametrize(
    ("action", "entity"), [("activate", "model_version"), ("round.start", "Round"), ("a.b", "")]
)
def test_record_refuses_badly_named_rows_before_writing(action: str, entity: str) -> None:
    with pytest.raises(ValueError, match="audit"):
        audit.record(None, action, entity, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--entity", "cell:"], "Invalid value for '--entity'"),
        (["--since", "last week"], "Invalid value for '--since'"),
        (["--limit", "0"], "Invalid value for '--limit'"),
    ],
)
def test_cli_refuses_malformed_filters_before_reaching_the_database(
    args: list[str], words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No database is reachable here: the command must fail on the argument, exit 2.
    monkeypatch.setenv("BMCELL_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    monkeypatch.setenv("BMCELL_S3_ENDPOINT", "127.0.0.1:1")
    result = CliRunner().invoke(cli, ["audit", *args])
    assert result.exit_code == 2, result.output
    assert words in result.output
