"""Container health check through the standard gRPC health service (grpc.health.v1): exit 0 when the server
answers SERVING for `service` ("" = the whole server: at least one model loaded), 1 otherwise.

    python healthcheck.py [HOST:PORT] [SERVICE]      # defaults: localhost:50051 and ""

TLS: set CONCEPTLENS_HEALTH_CA to the PEM CA file (and CONCEPTLENS_HEALTH_SERVER_NAME when the certificate does
not name HOST). Health checks never need the bearer token. Docker's HEALTHCHECK runs this (deploy/Dockerfile);
Kubernetes uses its native `grpc:` probes instead (deploy/k8s/deployment.yaml).
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, service: str = "", timeout: float = 3.0) -> bool:
    """True when `target` reports `service` SERVING within `timeout` seconds."""
    ca = os.environ.get("CONCEPTLENS_HEALTH_CA")
    if ca:
        options = []
        if os.environ.get("CONCEPTLENS_HEALTH_SERVER_NAME"):
            options.append(("grpc.ssl_target_name_override", os.environ["CONCEPTLENS_HEALTH_SERVER_NAME"]))
        with open(ca, "rb") as f:
            channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(f.read()), options=options)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            sys.stderr.write(f"health check of {target} {service!r} failed: {err.code().name} {err.details()}\n")
            return False
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        sys.stderr.write(f"{target} {service!r}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}\n")
        return False
    return True


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(0 if check(args[0] if args else "localhost:50051", args[1] if len(args) > 1 else "") else 1)
