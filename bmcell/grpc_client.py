"""Outbound gRPC: every call gets a deadline, even when the caller forgot one, and
the token of the channel (a person's API token, or a service's account token from
``BMCELL_SERVICE_TOKEN``) travels as ``authorization`` metadata on every call."""

from __future__ import annotations

import grpc

from bmcell import tls
from bmcell.settings import ServiceSettings


class _CallDefaults(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, timeout_s: float, token: str | None) -> None:
        self.timeout_s = timeout_s
        self.metadata = bearer(token) if token else ()

    def _with_defaults(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = list(details.metadata or ())
        if not any(key == "authorization" for key, _ in metadata):
            metadata += self.metadata  # a call's own token wins over the channel's
        return _Details(
            details.method,
            self.timeout_s if details.timeout is None else details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_defaults(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_defaults(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_defaults(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with_defaults(details), request_iterator)


class _Details(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def channel(
    address: str, *, default_timeout_s: float = 30.0, token: str | None = None
) -> grpc.Channel:
    """A TLS channel to ``address`` (bmcell.tls) whose calls time out after
    ``default_timeout_s`` and carry ``token`` (unless a call sends its own
    ``authorization``)."""
    raw = tls.grpc_channel(
        address,
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ],
    )
    return grpc.intercept_channel(raw, _CallDefaults(default_timeout_s, token))


def service_token(settings: ServiceSettings) -> str | None:
    """The account token a service sends to the services it calls (``stack up`` and
    ``deploy/`` set BMCELL_SERVICE_TOKEN)."""
    return settings.service_token.get_secret_value() if settings.service_token else None


def bearer(token: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying an API token (``bmcell users token NAME``)."""
    return (("authorization", f"Bearer {token}"),)
