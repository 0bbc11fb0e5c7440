"""`make bench-fairness`: is one tenant's flood felt by the others?

One noisy tenant offers 20x its per-second limit while nine quiet tenants each offer half of
theirs, all at once, through the real Envoy edge (JWT + per-tenant rate limit); printed per
tenant: offered and served RPS, error rate (by code) and p50/p99 latency. The quiet tenants
should see no errors at all and a p99 within a few milliseconds of a run without the noisy
tenant (the baseline, measured first in the same run). Then the edge's added latency: the same
paced load direct to the metering server and through Envoy.

Open-loop (requests are sent on a schedule whatever the answers' latency, as real clients
do), bounded in time and in requests in flight, loopback only. Uses ghz for the added-latency
part where it is installed; the project's own generator always.

  python -m bench.fairness [--limit 20] [--duration 10] [--quiet 9]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import field_mask_pb2

from bench import ghz
from copilot.v1 import common_pb2, tenant_pb2, tenant_pb2_grpc
from copilot_cli.supervisor import Mesh, settings_on_free_ports
from servers.common.identity import IDENTITY_HEADERS
from servers.common.settings import Settings

METHOD = "/copilot.v1.TenantService/GetTenant"
MAX_IN_FLIGHT = 512


@dataclass(frozen=True)
class Stream:
    label: str
    target: str
    metadata: tuple[tuple[str, str], ...]
    rps: float


@dataclass
class Outcome:
    label: str
    offered_rps: float
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)

    def summary(self, duration_s: float) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)
        q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) >= 2 else [float("nan")] * 99
        return {"tenant": self.label, "offered_rps": self.offered_rps, "served_rps": round(self.ok / duration_s, 1),
                "sent": self.sent, "error_rate": round(sum(self.errors.values()) / self.sent, 4) if self.sent else 0.0,
                "errors": self.errors, "p50_ms": round(q[49], 2), "p99_ms": round(q[98], 2)}


async def _paced(streams: list[Stream], duration_s: float, warmup_s: float) -> list[Outcome]:
    identity: Callable[[bytes], bytes] = lambda b: b  # noqa: E731 - raw bytes both ways
    request = tenant_pb2.GetTenantRequest().SerializeToString()
    outcomes = [Outcome(s.label, s.rps) for s in streams]
    channels = {target: grpc.aio.insecure_channel(target) for target in {s.target for s in streams}}
    in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
    start = time.perf_counter() + 0.2
    measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s
    tasks: set[asyncio.Task[None]] = set()

    async def one(stream: Stream, out: Outcome, call: Any, measured: bool) -> None:
        async with in_flight:
            t0 = time.perf_counter()
            try:
                await call(request, metadata=stream.metadata, timeout=5)
                code = None
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            if measured:
                out.sent += 1
                if code is None:
                    out.ok += 1
                    out.latencies_ms.append((time.perf_counter() - t0) * 1000)
                else:
                    out.errors[code] = out.errors.get(code, 0) + 1

    async def pace(stream: Stream, out: Outcome) -> None:
        call = channels[stream.target].unary_unary(METHOD, request_serializer=identity,
                                                   response_deserializer=identity)
        interval = 1.0 / stream.rps
        # Spread the streams' phases so they do not all fire on the same tick.
        due = start + (hash(stream.label) % 1000) / 1000 * interval
        while due < stop_at:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(stream, out, call, measure_from <= due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            due += interval

    try:
        await asyncio.gather(*(pace(s, o) for s, o in zip(streams, outcomes, strict=True)))
        if tasks:
            await asyncio.wait(tasks, timeout=10)
    finally:
        for channel in channels.values():
            await channel.close(None)
    return outcomes


def _run_process(streams: list[Stream], duration_s: float, warmup_s: float, out: Any) -> None:
    out.put(asyncio.run(_paced(streams, duration_s, warmup_s)))


def run_paced(streams: list[Stream], duration_s: float, warmup_s: float, processes: int = 2) -> list[Outcome]:
    """The streams split over `processes` client processes (one Python process tops out
    well below what the edge serves)."""
    groups = [streams[i::processes] for i in range(processes)]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_run_process, args=(g, duration_s, warmup_s, queue)) for g in groups if g]
    for p in procs:
        p.start()
    results = [queue.get(timeout=duration_s + warmup_s + 60) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    by_label = {o.label: o for r in results for o in r}
    return [by_label[s.label] for s in streams]


def _ghz(target: str, metadata: dict[str, str], rps: int, duration_s: float) -> dict[str, Any] | None:
    if ghz.find_ghz() is None:
        return None
    try:
        r = ghz.run(["--insecure", "--call", METHOD.lstrip("/").replace("/", "."), "-d", "{}",
                     "-m", json.dumps(metadata), "--rps", str(rps), "-c", "16", "-z", f"{duration_s:.0f}s", target],
                    duration_s=duration_s)
    except ghz.GhzError as exc:
        return {"error": str(exc)[-300:]}
    return {"rps": round(r.rps, 1), "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "errors": r.errors}


def _set_limits(stub: tenant_pb2_grpc.TenantServiceStub, operator: Any, tenant: str, rps: int) -> None:
    stub.UpdateTenant(tenant_pb2.UpdateTenantRequest(
        tenant=tenant_pb2.Tenant(tenant_id=tenant, limits=tenant_pb2.TenantLimits(
            requests_per_second=rps, requests_per_minute=min(rps * 60, 1_000_000_000),
            requests_per_hour=min(rps * 3600, 1_000_000_000))),
        update_mask=field_mask_pb2.FieldMask(paths=[
            "limits.requests_per_second", "limits.requests_per_minute", "limits.requests_per_hour"])),
        metadata=operator, timeout=10)


def _table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    print(f"  {'tenant':14} {'offered':>8} {'served':>8} {'errors':>8}  {'p50 ms':>7} {'p99 ms':>7}  error codes")
    for r in rows:
        print(f"  {r['tenant']:14} {r['offered_rps']:8.0f} {r['served_rps']:8.1f} {r['error_rate']:8.2%}  "
              f"{r['p50_ms']:7.2f} {r['p99_ms']:7.2f}  {r['errors'] or ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=20, help="every tenant's requests per second")
    parser.add_argument("--quiet", type=int, default=9, help="quiet tenants")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--latency-rps", type=int, default=200, help="paced load for the added-latency phase")
    args = parser.parse_args()
    if ghz.find_ghz() is None:
        print(f"note: {ghz.absent_reason()}, so only the project's own generator runs.")
    with tempfile.TemporaryDirectory(prefix="copilot-fairness-") as tmp:
        settings = replace(settings_on_free_ports(Settings.from_env(), Path(tmp)), tenant_cache_ttl_s=1.0)
        mesh = Mesh(settings, extra_env={"COPILOT_ACCESS_LOG": "0"})
        issuer = mesh.start()
        try:
            operator = (("authorization", f"Bearer {issuer.mint('platform', 'bench', ['operator'])}"),)
            tenants = ["noisy", *(f"quiet-{i}" for i in range(1, args.quiet + 1))]
            with grpc.insecure_channel(mesh.edge_address) as ch:
                stub = tenant_pb2_grpc.TenantServiceStub(ch)
                for t in tenants:
                    stub.CreateTenant(tenant_pb2.CreateTenantRequest(
                        tenant_id=f"fair-{t}", display_name=t, plan=common_pb2.PLAN_PRO), metadata=operator, timeout=10)
                    _set_limits(stub, operator, f"fair-{t}", args.limit)
                latency_tenant = "fair-latency"
                stub.CreateTenant(tenant_pb2.CreateTenantRequest(tenant_id=latency_tenant, plan=common_pb2.PLAN_PRO),
                                  metadata=operator, timeout=10)
                _set_limits(stub, operator, latency_tenant, 1_000_000)
            time.sleep(settings.tenant_cache_ttl_s * 2 + 1)  # the edge has loaded every tenant's limits

            def auth(tenant: str) -> tuple[tuple[str, str], ...]:
                return (("authorization", f"Bearer {issuer.mint(tenant, 'bench', ['member'], ttl_s=3600)}"),)

            quiet = [Stream(t, mesh.edge_address, auth(f"fair-{t}"), args.limit / 2) for t in tenants[1:]]
            noisy = Stream("noisy", mesh.edge_address, auth("fair-noisy"), args.limit * 20)
            baseline = run_paced(quiet, args.duration, args.warmup)
            time.sleep(1.1)  # next second window
            flooded = run_paced([noisy, *quiet], args.duration, args.warmup)

            direct_md = tuple(zip(IDENTITY_HEADERS, (latency_tenant, "bench", "member", ""), strict=True))
            direct = run_paced([Stream("direct", settings.address("metering"), direct_md, args.latency_rps)],
                               args.duration, args.warmup, processes=1)
            edge = run_paced([Stream("edge", mesh.edge_address, auth(latency_tenant), args.latency_rps)],
                             args.duration, args.warmup, processes=1)
            token = auth(latency_tenant)[0][1]
            ghz_direct = _ghz(settings.address("metering"), dict(direct_md), args.latency_rps, args.duration)
            ghz_edge = _ghz(mesh.edge_address, {"authorization": token}, args.latency_rps, args.duration)
        finally:
            mesh.stop()

    d = args.duration
    print(f"{METHOD}; every tenant limited to {args.limit}/s; {args.duration:.0f}s measured per phase; "
          f"{platform.machine()} x{_cores()}")
    base_rows = [o.summary(d) for o in baseline]
    flood_rows = [o.summary(d) for o in flooded]
    _table("baseline: quiet tenants alone, each at half its limit", base_rows)
    _table(f"flood: noisy tenant at 20x its limit ({args.limit * 20}/s) with the quiet tenants", flood_rows)
    quiet_base = [r for r in base_rows]
    quiet_flood = flood_rows[1:]
    worst_err = max(r["error_rate"] for r in quiet_flood)
    p99_base = statistics.median(r["p99_ms"] for r in quiet_base)
    p99_flood = statistics.median(r["p99_ms"] for r in quiet_flood)
    print(f"\nquiet tenants under the flood: worst error rate {worst_err:.2%}; median p99 {p99_flood:.2f} ms "
          f"vs {p99_base:.2f} ms alone ({p99_flood - p99_base:+.2f} ms)")
    dr, er = direct[0].summary(d), edge[0].summary(d)
    print(f"\nedge added latency at {args.latency_rps} rps (project generator): direct p50 {dr['p50_ms']:.2f} / "
          f"p99 {dr['p99_ms']:.2f} ms, through Envoy p50 {er['p50_ms']:.2f} / p99 {er['p99_ms']:.2f} ms "
          f"(+{er['p50_ms'] - dr['p50_ms']:.2f} / +{er['p99_ms'] - dr['p99_ms']:.2f} ms)")
    if ghz_direct is not None:
        print(f"edge added latency (ghz): direct {ghz_direct}, through Envoy {ghz_edge}")
    print(json.dumps({"baseline": base_rows, "flood": flood_rows, "direct": dr, "edge": er,
                      "ghz": {"direct": ghz_direct, "edge": ghz_edge}}))


def _cores() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    main()
