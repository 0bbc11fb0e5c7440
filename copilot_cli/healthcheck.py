"""`python -m copilot_cli.healthcheck ADDRESS [SERVICE]`: exit 0 when the gRPC health check
says SERVING (container health checks in compose.yaml; no grpc_health_probe binary needed)."""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout_s: float = 2.0) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print("usage: python -m copilot_cli.healthcheck ADDRESS [SERVICE]", file=sys.stderr)
        return 2
    return 0 if check(args[0], args[1] if len(args) > 1 else "") else 1


if __name__ == "__main__":
    raise SystemExit(main())
