"""Compile ``proto/bmcell/v1/*.proto`` into the ``bmcell.v1`` package.

``-I proto`` makes the generated imports come out as ``from bmcell.v1 import ...``
with no path rewriting. ``python -m bmcell.protogen [OUT_DIR]`` writes beside the
package by default; the staleness test writes into a temporary directory and compares.
"""

from __future__ import annotations

import sys
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


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO
    written = generate(out)
    print(f"protogen: {len(written)} files in {out / 'bmcell' / 'v1'}")


if __name__ == "__main__":
    main()
