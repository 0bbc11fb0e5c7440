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


# --- mixes, open loop and statistics (used by bench/loadsuite.py) ---------------------------

MAX_IN_FLIGHT = 2_000
CLIENT_BACKLOG = "CLIENT_BACKLOG"  # the generator had MAX_IN_FLIGHT calls outstanding: counted as an error


@dataclass(frozen=True)
class Call:
    """One prepared call of a mix: serialized request, its caller's metadata, a label
    that results are grouped by (e.g. the RPC name)."""

    label: str
    method: str  # "/pkg.Service/Method"
    request: bytes
    metadata: tuple[tuple[str, str], ...]
    streaming: bool = False  # unary request, server-streamed response (read to the end)


@dataclass(frozen=True)
class MixSpec:
    """A run over `calls` (cycled in order, each client starting at its own offset):
    closed loop when `concurrency` > 0 (that many calls always outstanding), open loop
    when `rate` > 0 (calls sent on a fixed schedule whatever the answers' latency)."""

    target: str
    calls: tuple[Call, ...]
    duration_s: float
    warmup_s: float = 2.0
    concurrency: int = 0
    rate: float = 0.0
    timeout_s: float = 10.0
    max_in_flight: int = MAX_IN_FLIGHT

    def __post_init__(self) -> None:
        if not self.calls:
            raise ValueError("a mix needs at least one call")
        if (self.concurrency > 0) == (self.rate > 0):
            raise ValueError("set exactly one of concurrency (closed loop) and rate (open loop)")
        if self.duration_s <= 0 or self.warmup_s < 0:
            raise ValueError("duration must be positive and warm-up not negative")


@dataclass
class Stats:
    label: str
    ok: int
    errors: dict[str, int]
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def rps(self) -> float:
        """Successful calls per second of the measured window."""
        return self.ok / self.duration_s if self.duration_s else 0.0


@dataclass
class Outcome:
    """What one client process saw: latencies (seconds) and error codes per label, and
    how far its sender fell behind the schedule (open loop)."""

    latencies: dict[str, list[float]]
    errors: dict[str, dict[str, int]]
    max_send_lag_s: float = 0.0


@dataclass
class MixResult:
    spec_rate: float
    spec_concurrency: int
    duration_s: float
    by_label: dict[str, Stats]
    total: Stats
    max_send_lag_s: float

    @property
    def offered_rps(self) -> float:
        return self.spec_rate


def percentile(sorted_values: list[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, and what
    statistics.quantiles(method="inclusive") gives): pct in [0, 100], values sorted."""
    if not sorted_values:
        return float("nan")
    if not 0 <= pct <= 100:
        raise ValueError("pct must be between 0 and 100")
    rank = (len(sorted_values) - 1) * pct / 100
    low = int(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def summarize(label: str, latencies_s: list[float], errors: dict[str, int], duration_s: float) -> Stats:
    values = sorted(latencies_s)
    ms = 1000.0
    return Stats(label=label, ok=len(values), errors=dict(errors), duration_s=duration_s,
                 p50_ms=percentile(values, 50) * ms, p90_ms=percentile(values, 90) * ms,
                 p99_ms=percentile(values, 99) * ms, max_ms=(values[-1] * ms) if values else float("nan"),
                 mean_ms=(sum(values) / len(values) * ms) if values else float("nan"))


def schedule(rate: float, duration_s: float, start: float = 0.0, phase: float = 0.0) -> list[float]:
    """Send times of a constant-rate open loop: start + (i + phase) / rate for every i with
    a time before start + duration_s. phase in [0, 1) staggers several senders."""
    if rate <= 0 or duration_s <= 0:
        return []
    if not 0 <= phase < 1:
        raise ValueError("phase must be in [0, 1)")
    count = int(rate * duration_s - phase) + 1
    times = [start + (i + phase) / rate for i in range(min(count, MAX_CALLS_PER_WORKER))]
    return [t for t in times if t < start + duration_s]


def merge(outcomes: list[Outcome]) -> Outcome:
    merged = Outcome(latencies={}, errors={})
    for out in outcomes:
        for label, values in out.latencies.items():
            merged.latencies.setdefault(label, []).extend(values)
        for label, codes in out.errors.items():
            target = merged.errors.setdefault(label, {})
            for code, n in codes.items():
                target[code] = target.get(code, 0) + n
        merged.max_send_lag_s = max(merged.max_send_lag_s, out.max_send_lag_s)
    return merged


def result_of(spec: MixSpec, outcome: Outcome) -> MixResult:
    labels = sorted(set(outcome.latencies) | set(outcome.errors))
    by_label = {label: summarize(label, outcome.latencies.get(label, []), outcome.errors.get(label, {}),
                                 spec.duration_s) for label in labels}
    all_errors: dict[str, int] = {}
    for codes in outcome.errors.values():
        for code, n in codes.items():
            all_errors[code] = all_errors.get(code, 0) + n
    total = summarize("all", [x for v in outcome.latencies.values() for x in v], all_errors, spec.duration_s)
    return MixResult(spec_rate=spec.rate, spec_concurrency=spec.concurrency, duration_s=spec.duration_s,
                     by_label=by_label, total=total, max_send_lag_s=outcome.max_send_lag_s)


class _Caller:
    """Sends prepared calls over one channel; records latency from a given origin (the send
    time in a closed loop, the scheduled time in an open loop: no coordinated omission)."""

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float) -> None:
        identity: Callable[[bytes], bytes] = lambda b: b  # noqa: E731 - raw bytes both ways
        self._unary: dict[str, Any] = {}
        self._stream: dict[str, Any] = {}
        self._channel, self._identity, self._timeout = channel, identity, timeout_s
        self.outcome = Outcome(latencies={}, errors={})

    async def send(self, call: Call) -> str | None:
        """The call's error code, None when it succeeded."""
        try:
            if call.streaming:
                stub = self._stream.get(call.method)
                if stub is None:
                    stub = self._stream[call.method] = self._channel.unary_stream(
                        call.method, request_serializer=self._identity, response_deserializer=self._identity)
                async for _ in stub(call.request, metadata=call.metadata, timeout=self._timeout):
                    pass
            else:
                stub = self._unary.get(call.method)
                if stub is None:
                    stub = self._unary[call.method] = self._channel.unary_unary(
                        call.method, request_serializer=self._identity, response_deserializer=self._identity)
                await stub(call.request, metadata=call.metadata, timeout=self._timeout)
            return None
        except grpc.aio.AioRpcError as exc:
            return exc.code().name

    async def send_scheduled(self, call: Call, due: float, measured: bool) -> None:
        code = await self.send(call)
        if measured:
            self.record(call.label, time.perf_counter() - due, code)

    def record(self, label: str, latency_s: float, code: str | None) -> None:
        if code is None:
            self.outcome.latencies.setdefault(label, []).append(latency_s)
        else:
            errors = self.outcome.errors.setdefault(label, {})
            errors[code] = errors.get(code, 0) + 1


async def closed_loop(spec: MixSpec, concurrency: int, offset: int) -> Outcome:
    async with grpc.aio.insecure_channel(spec.target) as channel:
        caller = _Caller(channel, spec.timeout_s)
        start = time.perf_counter()
        measure_from, stop_at = start + spec.warmup_s, start + spec.warmup_s + spec.duration_s
        n = len(spec.calls)

        async def worker(index: int) -> None:
            position = offset + index * 7919  # spread the workers over the mix
            for _ in range(MAX_CALLS_PER_WORKER):
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                call = spec.calls[position % n]
                position += 1
                code = await caller.send(call)
                t1 = time.perf_counter()
                # Only calls that started and ended inside the window count (and their latency).
                if t0 >= measure_from and t1 <= stop_at:
                    caller.record(call.label, t1 - t0, code)

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        return caller.outcome


async def open_loop(spec: MixSpec, rate: float, phase: float, offset: int) -> Outcome:
    async with grpc.aio.insecure_channel(spec.target) as channel:
        caller = _Caller(channel, spec.timeout_s)
        start = time.perf_counter() + 0.2  # the channel connects before the first due time
        measure_from = start + spec.warmup_s
        due_times = schedule(rate, spec.warmup_s + spec.duration_s, start, phase)
        tasks: set[asyncio.Task[None]] = set()
        n = len(spec.calls)
        lag = 0.0
        await channel.channel_ready()
        for i, due in enumerate(due_times):
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                lag = max(lag, -delay)
            call = spec.calls[(offset + i) % n]
            measured = due >= measure_from
            if len(tasks) >= spec.max_in_flight:
                if measured:
                    caller.record(call.label, 0.0, CLIENT_BACKLOG)
                continue
            task = asyncio.create_task(caller.send_scheduled(call, due, measured))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=spec.timeout_s + 5)
        caller.outcome.max_send_lag_s = lag
        return caller.outcome


def _mix_process(spec: MixSpec, share: float, phase: float, offset: int, out: Any) -> None:
    if spec.rate > 0:
        out.put(asyncio.run(open_loop(spec, share, phase, offset)))
    else:
        out.put(asyncio.run(closed_loop(spec, int(share), offset)))


def run_mix(spec: MixSpec, processes: int = 1) -> MixResult:
    """Runs the mix from `processes` client processes (the rate or the concurrency split
    between them) and merges what they measured."""
    processes = max(1, processes)
    if spec.rate > 0:
        shares: list[tuple[float, float]] = [(spec.rate / processes, i / processes) for i in range(processes)]
    else:
        counts = [spec.concurrency // processes + (1 if i < spec.concurrency % processes else 0)
                  for i in range(processes)]
        shares = [(float(c), 0.0) for c in counts if c]
    if len(shares) == 1:  # no child process needed
        share, phase = shares[0]
        coro = open_loop(spec, share, phase, 0) if spec.rate > 0 else closed_loop(spec, int(share), 0)
        return result_of(spec, asyncio.run(coro))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    stride = max(1, len(spec.calls) // len(shares))
    procs = [ctx.Process(target=_mix_process, args=(spec, share, phase, i * stride, queue))
             for i, (share, phase) in enumerate(shares)]
    for p in procs:
        p.start()
    try:
        outcomes = [queue.get(timeout=spec.warmup_s + spec.duration_s + spec.timeout_s + 60) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return result_of(spec, merge(outcomes))
