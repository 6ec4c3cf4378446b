"""``python -m bmcell.healthcheck [SERVICE]``: exit 0 when the gRPC service of this
process's settings (``BMCELL_GRPC_PORT`` on 127.0.0.1) answers SERVING, over TLS
unless ``BMCELL_TLS=off``.

Kubernetes' built-in gRPC probe and a bare ``grpc.insecure_channel`` cannot speak TLS,
so the pods' probes (deploy/k8s) and compose's healthchecks run this instead.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bmcell import tls
from bmcell.errors import ConfigError


def main(argv: list[str]) -> int:
    service = argv[0] if argv else ""
    port = os.environ.get("BMCELL_GRPC_PORT")
    if not port:
        print("healthcheck: BMCELL_GRPC_PORT is not set", file=sys.stderr)
        return 2
    try:
        channel = tls.grpc_channel(f"127.0.0.1:{port}")
    except ConfigError as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 2
    try:
        with channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=3
            )
    except grpc.RpcError as exc:
        print(f"healthcheck: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
