"""CPU of the per-call plumbing every mesh hop pays: the same trivial unary call served and made
in one process, with nothing, then with the mesh's interceptor stacks, as each service sets
them up (`servers.common.lifecycle`: OpenTelemetry's server and client interceptors and the
identity ones; telemetry set up without an exporter, as the mesh runs by default).

  python -m bench.interceptors [--calls 3000] [--concurrency 16] [--rounds 3]

Stacks: bare (no interceptor), OpenTelemetry's server or client interceptor alone, the
identity server or client interceptor alone, and "mesh" (all four, as every hop has them).
Per stack: process CPU (client + server, one process) per call, its extra over the bare call,
and that extra in bare calls' worth. The best of `--rounds` rounds is kept (the machine is
shared). Prints only; one run per interpreter (the tracer provider is set once per process).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from typing import Any

import grpc

from servers.common import telemetry
from servers.common.identity import MEMBER, Identity, acting_as
from servers.common.interceptors import IdentityServerInterceptor, identity_client_interceptors
from servers.common.metrics import observe_rpc

METHOD = "/bench.Plumbing/Call"


async def _handler(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


STACKS = ("bare", "otel-server", "otel-client", "identity-server", "identity-client", "mesh")


def _stack(name: str) -> tuple[list[Any], list[Any]]:
    """(server interceptors, client interceptors) of a named stack; "mesh" is what every
    service's server and every channel to another service have."""
    server: list[Any] = []
    client: list[Any] = []
    if name in ("otel-server", "mesh"):
        server += telemetry.server_interceptors()
    if name in ("identity-server", "mesh"):
        server.append(IdentityServerInterceptor(access_log=False))
    if name in ("otel-client", "mesh"):
        client += telemetry.client_interceptors()
    if name in ("identity-client", "mesh"):
        client += identity_client_interceptors()
    return server, client


async def measure(name: str, calls: int, concurrency: int) -> float:
    """CPU seconds per call (this process: client and server)."""
    server_side, client_side = _stack(name)
    server = grpc.aio.server(interceptors=server_side)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Plumbing", {
        "Call": grpc.unary_unary_rpc_method_handler(_handler)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=client_side)
    call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
    who = Identity("bench", "user", frozenset({MEMBER}))
    # The identity headers Envoy would set, unless the identity client interceptor sends them.
    metadata = None if name in ("identity-client", "mesh") else who.metadata()

    async def worker(n: int) -> None:
        with acting_as(who):
            for _ in range(n):
                await call(b"x" * 64, metadata=metadata, timeout=10)

    try:
        await asyncio.gather(*(worker(10) for _ in range(concurrency)))  # warm-up
        started = time.process_time()
        await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
        return (time.process_time() - started) / (calls // concurrency * concurrency)
    finally:
        await channel.close(None)
        await server.stop(None)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.calls < args.concurrency or args.concurrency < 1 or args.rounds < 1:
        parser.error("--calls must be at least --concurrency, both positive; --rounds positive")
    telemetry.setup("bench", None)
    # What an observed call costs the metrics alone (the identity interceptor's part of it).
    started = time.process_time()
    for _ in range(20_000):
        observe_rpc("/copilot.v1.RetrievalService/Search", grpc.StatusCode.OK, 0.001)
    metrics_us = (time.process_time() - started) / 20_000 * 1e6
    results: dict[str, float] = {}
    for _ in range(args.rounds):  # stacks interleaved, so a busy spell of the machine hits them all
        for name in STACKS:
            seconds = asyncio.run(measure(name, args.calls, args.concurrency))
            results[name] = min(results.get(name, seconds), seconds)
    bare = results["bare"]
    print(f"{args.calls} calls per round, concurrency {args.concurrency}, best of {args.rounds} rounds; "
          "CPU of client and server together")
    print("| stack | CPU µs per call | extra over bare µs | extra in bare calls |")
    print("|---|---|---|---|")
    for name, seconds in results.items():
        print(f"| {name} | {seconds * 1e6:.0f} | {(seconds - bare) * 1e6:.0f} | {(seconds - bare) / bare:.2f} |")
    print(f"\nmetrics.observe_rpc alone: {metrics_us:.1f} µs per call")


if __name__ == "__main__":
    main()
