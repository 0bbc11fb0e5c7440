"""A closed-loop gRPC load generator (the project's own; ghz is used where installed).

Each client process runs `concurrency` coroutines that call one RPC back to back for a
fixed duration; latencies of the measured window (after warm-up) are merged. Bounded in
time and count, loopback only.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

MAX_CALLS_PER_WORKER = 2_000_000


@dataclass(frozen=True)
class LoadSpec:
    target: str
    method: str  # "/pkg.Service/Method"
    request: bytes
    metadata: tuple[tuple[str, str], ...]
    concurrency: int
    duration_s: float
    warmup_s: float


@dataclass
class LoadResult:
    calls: int
    errors: dict[str, int]
    rps: float
    p50_ms: float
    p99_ms: float

    def row(self, label: str) -> str:
        errs = sum(self.errors.values())
        return f"{label:28} {self.rps:9.0f} rps   p50 {self.p50_ms:7.2f} ms   p99 {self.p99_ms:7.2f} ms   errors {errs}"


async def _client(spec: LoadSpec, share: int) -> tuple[list[float], dict[str, int], float]:
    identity: Callable[[bytes], bytes] = lambda b: b  # noqa: E731 - raw bytes both ways
    async with grpc.aio.insecure_channel(spec.target) as channel:
        call = channel.unary_unary(spec.method, request_serializer=identity, response_deserializer=identity)
        latencies: list[float] = []
        errors: dict[str, int] = {}
        start = time.perf_counter()
        measure_from = start + spec.warmup_s
        stop_at = measure_from + spec.duration_s

        async def worker() -> None:
            for _ in range(MAX_CALLS_PER_WORKER):
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                try:
                    await call(spec.request, metadata=spec.metadata, timeout=10)
                    ok_code = None
                except grpc.aio.AioRpcError as exc:
                    ok_code = exc.code().name
                t1 = time.perf_counter()
                if t0 >= measure_from and t1 <= stop_at:
                    if ok_code is None:
                        latencies.append(t1 - t0)
                    else:
                        errors[ok_code] = errors.get(ok_code, 0) + 1

        await asyncio.gather(*(worker() for _ in range(share)))
    return latencies, errors, spec.duration_s


def _process(spec: LoadSpec, share: int, out: Any) -> None:
    out.put(asyncio.run(_client(spec, share)))


def run(spec: LoadSpec, processes: int = 1) -> LoadResult:
    shares = [spec.concurrency // processes + (1 if i < spec.concurrency % processes else 0) for i in range(processes)]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_process, args=(spec, share, queue)) for share in shares if share]
    for p in procs:
        p.start()
    results = [queue.get(timeout=spec.warmup_s + spec.duration_s + 60) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    latencies = sorted(x for r in results for x in r[0])
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r[1].items():
            errors[k] = errors.get(k, 0) + v
    if not latencies:
        return LoadResult(0, errors, 0.0, float("nan"), float("nan"))
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return LoadResult(calls=len(latencies), errors=errors, rps=len(latencies) / spec.duration_s,
                      p50_ms=q[49] * 1000, p99_ms=q[98] * 1000)
