"""Start the rounds service: `python -m services.rounds` (settings from BMCELL_* variables)."""

from __future__ import annotations

from bmcell.grpc_server import run_service
from bmcell.runtime import boot
from bmcell.settings import RoundsSettings
from services.rounds.server import build


def main() -> None:
    runtime = boot("rounds", RoundsSettings)
    run_service(runtime.settings, build(runtime))


if __name__ == "__main__":
    main()
