"""Start the selector service: `python -m services.selector` (settings from BMCELL_* variables)."""

from __future__ import annotations

from bmcell.grpc_server import run_service
from bmcell.runtime import boot
from bmcell.settings import SelectorSettings
from services.selector.server import build


def main() -> None:
    runtime = boot("selector", SelectorSettings)
    run_service(runtime.settings, build(runtime))


if __name__ == "__main__":
    main()
