"""The server interceptor that authenticates and authorizes every gRPC call.

Before a handler runs (before the first message of a stream is read), the caller's
``authorization: Bearer <token>`` metadata becomes a :class:`~bmcell.auth.Principal`
and :mod:`bmcell.policy` decides whether its role may make the call. No or a bad
token answers UNAUTHENTICATED, a role the rule does not list PERMISSION_DENIED, and
a method without a rule PERMISSION_DENIED too. The handler then runs inside
:func:`~bmcell.auth.acting_as`, in the thread that serves it, so whatever it records
(the audit trail) names the caller, and its lab checks read the same principal.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import grpc

from bmcell import audit, log, policy
from bmcell.auth import Principal, acting_as, bearer_token
from bmcell.errors import BmcellError, request_id
from bmcell.grpc_wrap import rewrap

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

_LOG = log.get(__name__)

Authenticate = Callable[[str], Principal]


class AuthInterceptor(grpc.ServerInterceptor):
    """``authenticate`` turns a token into a principal (bmcell.auth.authenticate over
    the service's database); ``production`` closes reflection to callers without one."""

    def __init__(self, authenticate: Authenticate, *, production: bool) -> None:
        self.authenticate = authenticate
        self.production = production

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        rule = policy.grpc_rule(method, production=self.production)
        if rule is not None and rule.open:
            return handler

        def check(context: grpc.ServicerContext) -> Principal:
            try:
                metadata = dict(context.invocation_metadata())
                principal = self.authenticate(bearer_token(metadata.get("authorization")))
                policy.authorize(principal, rule, method)
            except BmcellError as exc:
                # Aborted here rather than raised: health and reflection calls do not
                # pass through the error-mapping interceptor.
                _LOG.info("rpc refused", method=method, code=exc.grpc_code, detail=str(exc))
                context.abort(grpc.StatusCode[exc.grpc_code], str(exc))
            return principal

        def unary_response(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(request, context):
                principal = check(context)
                with _as_caller(principal, context):
                    return behavior(request, context)

            return wrapper

        def stream_response(behavior: Callable[..., Iterator[Any]]) -> Callable[..., Any]:
            def wrapper(request, context):
                principal = check(context)
                # gRPC drains a response stream in the thread that started it, so the
                # principal stays set for every message the handler yields.
                with _as_caller(principal, context):
                    yield from behavior(request, context)

            return wrapper

        return rewrap(handler, unary_response, stream_response)


def _as_caller(principal: Principal, context: grpc.ServicerContext) -> ExitStack:
    """The handler's scope: acting as ``principal``, its audit rows tagged with the
    call's ``x-request-id`` metadata (or a new id), the same id as the labeling API's."""
    given = dict(context.invocation_metadata()).get("x-request-id", "")
    scope = ExitStack()
    scope.enter_context(acting_as(principal))
    scope.enter_context(audit.request_scope(given if _REQUEST_ID.match(given) else request_id()))
    return scope
