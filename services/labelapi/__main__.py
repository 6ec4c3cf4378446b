"""Start the labeling API: `python -m services.labelapi` (settings from BMCELL_* variables)."""

from __future__ import annotations

import sys

import uvicorn

from bmcell import tls
from bmcell.errors import ConfigError
from bmcell.runtime import boot
from bmcell.settings import LabelApiSettings
from services.labelapi.app import create_app


def main() -> None:
    runtime = boot("labelapi", LabelApiSettings)
    try:
        https = tls.uvicorn_options(runtime.settings)
    except ConfigError as exc:
        print(f"labelapi: bad configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    config = uvicorn.Config(
        create_app(runtime),
        host=runtime.settings.host,
        port=runtime.settings.http_port,
        log_config=None,
        timeout_graceful_shutdown=10,
        **https,
    )
    # uvicorn handles SIGTERM itself: it stops accepting, drains requests, then returns.
    uvicorn.Server(config).run()
    runtime.db.close()


if __name__ == "__main__":
    main()
