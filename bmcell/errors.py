"""Every error bmcell raises on purpose, and the status it carries to clients.

    BmcellError                  INTERNAL            500
    ├── ConfigError              (start-up only: the process exits naming the setting)
    ├── InvalidArgument          INVALID_ARGUMENT    400  (names the field)
    ├── Unauthenticated          UNAUTHENTICATED     401
    ├── PermissionDenied         PERMISSION_DENIED   403
    ├── NotFound                 NOT_FOUND           404
    ├── Conflict                 ABORTED             409  (stale lease, concurrent change)
    ├── FailedPrecondition       FAILED_PRECONDITION 412  (wrong round state, no active model)
    └── Unavailable              UNAVAILABLE         503  (Postgres, S3, Triton, Ray down)

Status codes are names, not ``grpc.StatusCode`` members, so domain modules can raise
these without importing grpc; the server interceptor and the HTTP layer map them.
"""

from __future__ import annotations


class BmcellError(Exception):
    grpc_code = "INTERNAL"
    http_status = 500

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

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


class Unavailable(BmcellError):
    grpc_code = "UNAVAILABLE"
    http_status = 503
