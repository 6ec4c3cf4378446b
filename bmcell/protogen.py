"""Compile ``proto/bmcell/v1/*.proto`` into the ``bmcell.v1`` package.

``-I proto`` makes the generated imports come out as ``from bmcell.v1 import ...``
with no path rewriting. ``python -m bmcell.protogen [OUT_DIR]`` writes beside the
package by default; the staleness test writes into a temporary directory and compares.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "proto"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "bmcell" / "v1").glob("*.proto"))


def generate(out_dir: Path = REPO) -> list[Path]:
    """Run protoc for every contract; returns the files written under ``out_dir``."""
    from grpc_tools import protoc  # build-time only: grpcio-tools is a dev dependency

    include = Path(protoc.__file__).parent / "_proto"
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {files}")
    generated = out_dir / "bmcell" / "v1"
    return sorted(p for p in generated.iterdir() if p.name.endswith((".py", ".pyi")))


def stale_files() -> list[str]:
    """Generated files under ``bmcell/v1`` that differ from what protoc makes now."""
    with tempfile.TemporaryDirectory() as tmp:
        written = generate(Path(tmp))
        committed = Path(__file__).parent / "v1"
        stale = [
            p.name
            for p in written
            if not (committed / p.name).exists()
            or (committed / p.name).read_bytes() != p.read_bytes()
        ]
        extra = {p.name for p in committed.glob("*_pb2*.py*")} - {p.name for p in written}
    return sorted(stale) + sorted(extra)


def main() -> None:
    if sys.argv[1:] == ["--check"]:
        stale = stale_files()
        if stale:
            sys.exit(f"protogen: generated code is stale ({', '.join(stale)}); run `make proto`")
        print("protogen: generated code matches proto/")
        return
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO
    written = generate(out)
    print(f"protogen: {len(written)} files in {out / 'bmcell' / 'v1'}")


if __name__ == "__main__":
    main()
