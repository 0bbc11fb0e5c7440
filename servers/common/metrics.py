"""Prometheus metrics of a server process: every RPC by method and status, with latency.

Labels stay bounded: method names come from the contracts and codes from gRPC, never
tenant ids or request data. Each process serves /metrics on its own port.
"""

from __future__ import annotations

import logging

import grpc
from prometheus_client import Counter, Histogram, start_http_server

log = logging.getLogger("copilot.metrics")

RPC_REQUESTS = Counter(
    "copilot_rpc_requests_total", "RPCs served, by method and gRPC status code.", ["service", "method", "code"])
RPC_LATENCY = Histogram(
    "copilot_rpc_latency_seconds", "Time to serve an RPC (server side, until the handler returns).",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)


def observe_rpc(full_method: str, code: grpc.StatusCode, seconds: float) -> None:
    service, _, method = full_method.lstrip("/").rpartition("/")
    RPC_REQUESTS.labels(service, method, code.name).inc()
    RPC_LATENCY.labels(service, method).observe(seconds)


def serve(host: str, port: int) -> None:
    """Serves /metrics on host:port from a daemon thread (0 disables)."""
    if port:
        start_http_server(port, addr=host)
        log.info("metrics", extra={"address": f"{host}:{port}"})
