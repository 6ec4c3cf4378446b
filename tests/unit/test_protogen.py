"""The committed stubs in bmcell/v1 must be what `make proto` produces now."""

from __future__ import annotations

from pathlib import Path

from bmcell import protogen


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    written = protogen.generate(tmp_path)
    assert written, "protoc produced nothing"
    committed = Path(protogen.__file__).parent / "v1"
    stale = [p.name for p in written if (committed / p.name).read_bytes() != p.read_bytes()]
    missing = [p.name for p in written if not (committed / p.name).exists()]
    assert not missing, f"run `make proto`: missing {missing}"
    assert not stale, f"run `make proto`: stale {stale}"
    extra = {p.name for p in committed.glob("*_pb2*.py*")} - {p.name for p in written}
    assert not extra, f"generated files without a .proto: {sorted(extra)}"
