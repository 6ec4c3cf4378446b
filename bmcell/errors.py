"""Every error bmcell raises on purpose, and the status it carries to clients.

    BmcellError                  INTERNAL            500
    ├── ConfigError              (start-up only: the process exits naming the setting)
    ├── InvalidArgument          INVALID_ARGUMENT    400  (names the field)
    ├── Unauthenticated          UNAUTHENTICATED     401
    ├── PermissionDenied         PERMISSION_DENIED   403
    ├── NotFound                 NOT_FOUND           404
    ├── Conflict                 ABORTED             409  (stale lease, concurrent change)
    ├── FailedPrecondition       FAILED_PRECONDITION 412  (wrong round state, no active model)
    ├── DeadlineExceeded         DEADLINE_EXCEEDED   408  (an upload stream idle or too slow)
    └── Unavailable              UNAVAILABLE         503  (Postgres, S3, Triton, Ray down)

Status codes are names, not ``grpc.StatusCode`` members, so domain modules can raise
these without importing grpc; the server interceptor and the HTTP layer map them.

``message`` goes to the client; ``detail`` (a driver's or a server's own words: SQL,
hostnames, S3 error bodies) only to the server's log, under a request id that the
client is given instead (:func:`request_id`). A client never reads raw database or
object-storage text.
"""

from __future__ import annotations

import secrets


def request_id() -> str:
    """A short id that ties what a client was told to what the server logged."""
    return secrets.token_hex(8)


class BmcellError(Exception):
    grpc_code = "INTERNAL"
    http_status = 500

    def __init__(
        self, message: str, *, field: str | None = None, detail: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.detail = detail  # for the log only, never for the client

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class ConfigError(BmcellError):
    """A setting is missing or unusable; raised before a process starts serving."""


class InvalidArgument(BmcellError):
    grpc_code = "INVALID_ARGUMENT"
    http_status = 400


class Unauthenticated(BmcellError):
    grpc_code = "UNAUTHENTICATED"
    http_status = 401


class PermissionDenied(BmcellError):
    grpc_code = "PERMISSION_DENIED"
    http_status = 403


class NotFound(BmcellError):
    grpc_code = "NOT_FOUND"
    http_status = 404


class Conflict(BmcellError):
    grpc_code = "ABORTED"
    http_status = 409


class FailedPrecondition(BmcellError):
    grpc_code = "FAILED_PRECONDITION"
    http_status = 412


class DeadlineExceeded(BmcellError):
    grpc_code = "DEADLINE_EXCEEDED"
    http_status = 408


class Unavailable(BmcellError):
    grpc_code = "UNAVAILABLE"
    http_status = 503
