"""Wrap the behaviour of a gRPC method handler, whatever its streaming kind: what
the server interceptors (errors and metrics, authentication) share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]


def rewrap(
    handler: grpc.RpcMethodHandler, unary_response: Wrap, stream_response: Wrap
) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour wrapped: ``unary_response`` for methods that answer
    one message, ``stream_response`` for those that answer a stream."""
    if handler.unary_unary:
        return handler._replace(unary_unary=unary_response(handler.unary_unary))
    if handler.stream_unary:
        return handler._replace(stream_unary=unary_response(handler.stream_unary))
    if handler.unary_stream:
        return handler._replace(unary_stream=stream_response(handler.unary_stream))
    return handler._replace(stream_stream=stream_response(handler.stream_stream))
