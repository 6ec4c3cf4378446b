"""The committed stubs in bmcell/v1 must be what `make proto` produces now."""

from __future__ import annotations

from bmcell import protogen


def test_generated_code_is_fresh() -> None:
    assert protogen.stale_files() == [], "run `make proto` and commit bmcell/v1"
