"""Outbound gRPC: every call gets a deadline, even when the caller forgot one; a
person's API token travels as ``authorization`` metadata (:func:`bearer`)."""

from __future__ import annotations

import grpc

from bmcell import tls


class _DefaultDeadline(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s

    def _with_deadline(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        if details.timeout is not None:
            return details
        return _Details(
            details.method,
            self.timeout_s,
            details.metadata,
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_deadline(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_deadline(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_deadline(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with_deadline(details), request_iterator)


class _Details(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def channel(address: str, *, default_timeout_s: float = 30.0) -> grpc.Channel:
    """A TLS channel to ``address`` (bmcell.tls); calls time out after ``default_timeout_s``."""
    raw = tls.grpc_channel(
        address,
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ],
    )
    return grpc.intercept_channel(raw, _DefaultDeadline(default_timeout_s))


def bearer(token: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying an API token (``bmcell users token NAME``)."""
    return (("authorization", f"Bearer {token}"),)
