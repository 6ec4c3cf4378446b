"""Start the trainer service: `python -m services.trainer` (settings from BMCELL_* variables)."""

from __future__ import annotations

from bmcell.grpc_server import run_service
from bmcell.runtime import boot
from bmcell.settings import TrainerSettings
from services.trainer.server import build


def main() -> None:
    runtime = boot("trainer", TrainerSettings)
    run_service(runtime.settings, build(runtime))


if __name__ == "__main__":
    main()
