"""The one way a bmcell gRPC service starts, serves and stops.

``run_service`` wires what every service must have: the error-mapping and metrics
interceptor, the authentication and authorization interceptor (bmcell.grpc_auth:
every method needs a token but health, and reflection outside production),
``grpc.health.v1`` (SERVING only once handlers are registered, NOT_SERVING
while a dependency the service cannot work without, Postgres, fails its probe, and
NOT_SERVING as soon as shutdown begins, so load balancers drain first), reflection,
a Prometheus ``/metrics`` endpoint, and a graceful stop on SIGTERM/SIGINT that lets
in-flight calls finish within ``shutdown_grace_s``.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Histogram, start_http_server

from bmcell import log, tls
from bmcell.auth import authenticate
from bmcell.db import Database
from bmcell.errors import BmcellError, ConfigError, request_id
from bmcell.grpc_auth import AuthInterceptor
from bmcell.grpc_wrap import rewrap
from bmcell.settings import ServiceSettings

_LOG = log.get(__name__)

RPC_TOTAL = Counter(
    "bmcell_grpc_requests_total", "gRPC calls handled", ["service", "method", "code"]
)
RPC_SECONDS = Histogram(
    "bmcell_grpc_request_duration_seconds",
    "gRPC call latency",
    ["service", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)


# How often a service probes its dependencies for its health status.
DEPENDENCY_PROBE_S = 1.0


def _split(full_method: str) -> tuple[str, str]:
    _, service, method = full_method.split("/")
    return service, method


class ErrorAndMetricsInterceptor(grpc.ServerInterceptor):
    """Maps BmcellError to its status, hides other exceptions as INTERNAL, counts calls."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = _split(handler_call_details.method)
        if service.startswith("grpc."):  # health and reflection: not worth a series each
            return handler

        def observe(code: str, started: float) -> None:
            RPC_TOTAL.labels(service, method, code).inc()
            RPC_SECONDS.labels(service, method).observe(time.perf_counter() - started)

        def fail(context: grpc.ServicerContext, exc: Exception, started: float):
            # What the client reads never carries a driver's or a store's own text:
            # that goes to the log under a request id the client is given instead.
            if isinstance(exc, BmcellError):
                code = grpc.StatusCode[exc.grpc_code]
                detail = str(exc)
                if exc.detail is not None:
                    rid = request_id()
                    detail = f"{detail} (request id {rid})"
                    _LOG.warning(
                        "rpc refused",
                        method=method,
                        code=code.name,
                        request_id=rid,
                        detail=exc.detail,
                        message=str(exc),
                    )
                else:
                    _LOG.info("rpc refused", method=method, code=code.name, detail=detail)
            else:
                rid = request_id()
                code = grpc.StatusCode.INTERNAL
                detail = f"internal error in {method}; see the server log, request id {rid}"
                _LOG.exception("rpc failed", method=method, request_id=rid)
            observe(code.name, started)
            context.abort(code, detail)

        def unary_response(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(request, context):
                started = time.perf_counter()
                try:
                    response = behavior(request, context)
                except Exception as exc:
                    if _is_abort(context):
                        observe(context.code().name, started)
                        raise
                    fail(context, exc, started)
                observe("OK", started)
                return response

            return wrapper

        def stream_response(behavior: Callable[..., Iterator[Any]]) -> Callable[..., Any]:
            def wrapper(request, context):
                started = time.perf_counter()
                try:
                    yield from behavior(request, context)
                except Exception as exc:
                    if _is_abort(context):
                        observe(context.code().name, started)
                        raise
                    fail(context, exc, started)
                observe("OK", started)

            return wrapper

        return rewrap(handler, unary_response, stream_response)


def _is_abort(context: grpc.ServicerContext) -> bool:
    """True when the handler already called ``context.abort`` (its exception must pass)."""
    code = context.code()
    return code is not None and code != grpc.StatusCode.OK


@dataclass
class Service:
    """What a service module hands to ``run_service``."""

    name: str
    # (server) -> full names of the registered gRPC services, e.g. "bmcell.v1.Segmenter"
    register: Callable[[grpc.Server], list[str]]
    # Where callers' tokens are checked.
    db: Database
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    # Probes that raise when a dependency is down (e.g. ``Database.ping``): health
    # follows them, see ``watch_dependencies``.
    dependencies: list[Callable[[], None]] = field(default_factory=list)


class RunningServer:
    def __init__(
        self,
        server: grpc.Server,
        health_servicer: health.HealthServicer,
        names: list[str],
        metrics_httpd: Any,
        grace_s: float,
        on_stop: list[Callable[[], None]],
    ) -> None:
        self.server = server
        self.health = health_servicer
        self.names = names
        self.metrics_httpd = metrics_httpd
        self.grace_s = grace_s
        self.on_stop = on_stop
        self.stopped = threading.Event()

    def stop(self) -> None:
        if self.stopped.is_set():
            return
        self.stopped.set()
        _LOG.info("shutting down", grace_s=self.grace_s)
        self.health.enter_graceful_shutdown()
        self.server.stop(self.grace_s).wait()
        for callback in self.on_stop:
            try:
                callback()
            except Exception:  # one failing cleanup must not skip the others
                _LOG.exception("cleanup failed during shutdown")
        if self.metrics_httpd is not None:
            self.metrics_httpd.shutdown()
        _LOG.info("stopped")

    def wait(self) -> None:
        self.server.wait_for_termination()


def server_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    """Channel arguments of every bmcell server: message caps set, never gRPC's defaults."""
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
        ("grpc.max_send_message_length", settings.grpc_max_message_bytes),
        ("grpc.max_metadata_size", 16 * 1024),
    ]


def start_server(settings: ServiceSettings, service: Service) -> RunningServer:
    """Bind, register and start; raises ConfigError naming the port setting on a clash."""
    if settings.tls == "on":
        tls.server_files(settings)  # a missing certificate stops the start before any port opens
    try:
        metrics = start_http_server(settings.metrics_port, addr=settings.host)
        metrics_httpd = metrics[0] if isinstance(metrics, tuple) else None
    except OSError as exc:
        raise ConfigError(
            f"BMCELL_METRICS_PORT={settings.metrics_port}: cannot listen on "
            f"{settings.host}:{settings.metrics_port} ({exc.strerror or exc})"
        ) from exc

    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=settings.grpc_workers, thread_name_prefix=service.name
        ),
        # The first is outermost: refusals by the auth interceptor are counted too.
        interceptors=[
            ErrorAndMetricsInterceptor(),
            AuthInterceptor(
                lambda token: authenticate(service.db, token),
                production=settings.env == "production",
            ),
        ],
        options=server_options(settings),
        # Past this many calls in progress the server answers RESOURCE_EXHAUSTED at
        # once rather than queueing without bound (BMCELL_GRPC_MAX_CONCURRENT_RPCS).
        maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs,
    )
    names = service.register(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    address = f"{settings.host}:{settings.grpc_port}"
    try:
        bound = tls.add_grpc_port(server, address, settings)
    except RuntimeError as exc:
        bound = 0
        reason = str(exc)
    else:
        reason = "address in use"
    if bound == 0:
        if metrics_httpd is not None:
            metrics_httpd.shutdown()
        raise ConfigError(
            f"BMCELL_GRPC_PORT={settings.grpc_port}: cannot listen on {address} ({reason})"
        )
    server.start()
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    _LOG.info("serving", address=address, metrics_port=settings.metrics_port, services=names)
    running = RunningServer(
        server, health_servicer, names, metrics_httpd, settings.shutdown_grace_s, service.on_stop
    )
    if service.dependencies:
        threading.Thread(
            target=watch_dependencies,
            args=(running, service.dependencies),
            name=f"{service.name}-health",
            daemon=True,
        ).start()
    return running


def watch_dependencies(
    running: RunningServer,
    probes: list[Callable[[], None]],
    interval_s: float = DEPENDENCY_PROBE_S,
) -> None:
    """Every ``interval_s``, run each probe; health is NOT_SERVING while any raises and
    SERVING again once all pass, with no restart. Shutdown's NOT_SERVING is final (the
    health servicer ignores later changes)."""
    serving = True
    while not running.stopped.wait(interval_s):
        failure = None
        for probe in probes:
            try:
                probe()
            except Exception as exc:  # any failure of a probe is the dependency's
                failure = exc
                break
        if (failure is None) == serving:
            continue
        serving = failure is None
        status = health_pb2.HealthCheckResponse.SERVING
        if not serving:
            status = health_pb2.HealthCheckResponse.NOT_SERVING
            _LOG.warning("a dependency is down: not serving", error=str(failure))
        else:
            _LOG.info("dependencies are back: serving")
        for name in ["", *running.names]:
            running.health.set(name, status)


def run_service(settings: ServiceSettings, service: Service) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully."""
    try:
        running = start_server(settings, service)
    except ConfigError as exc:
        _LOG.error("cannot start", error=str(exc))
        print(f"{service.name}: bad configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc

    def on_signal(signum: int, _frame: object) -> None:
        _LOG.info("signal received", signal=signal.Signals(signum).name)
        threading.Thread(target=running.stop, name="shutdown").start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    running.wait()
    running.stopped.wait(timeout=settings.shutdown_grace_s + 5)
