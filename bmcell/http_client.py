"""HTTP clients of the labeling API: one place that says how they authenticate and
which certificates they trust (the HTTP side of :mod:`bmcell.grpc_client`)."""

from __future__ import annotations

import httpx

from bmcell import tls


def client(base_url: str, token: str, timeout: float = 60.0) -> httpx.Client:
    """A client whose requests carry ``token``; an https:// API is verified against
    BMCELL_TLS_CA (the stack's CA), never the system's CAs."""
    verify = tls.httpx_verify() if base_url.startswith("https://") else True
    return httpx.Client(
        base_url=base_url,
        headers={"Authorization": f"Bearer {token}"},
        timeout=timeout,
        verify=verify,
    )
