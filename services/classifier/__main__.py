"""Start the classifier service: `python -m services.classifier` (settings from BMCELL_* variables)."""

from __future__ import annotations

from bmcell.grpc_server import run_service
from bmcell.runtime import boot
from bmcell.settings import ClassifierSettings
from services.classifier.server import build


def main() -> None:
    runtime = boot("classifier", ClassifierSettings)
    run_service(runtime.settings, build(runtime))


if __name__ == "__main__":
    main()
