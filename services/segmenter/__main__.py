"""Start the segmenter service: `python -m services.segmenter` (settings from BMCELL_* variables)."""

from __future__ import annotations

from bmcell.grpc_server import run_service
from bmcell.runtime import boot
from bmcell.settings import SegmenterSettings
from services.segmenter.server import build


def main() -> None:
    runtime = boot("segmenter", SegmenterSettings)
    run_service(runtime.settings, build(runtime))


if __name__ == "__main__":
    main()
