"""Metering benchmarks.

  python -m bench.metering ingest [--events 200000] [--batch 1000] [--concurrency 4]
      usage events/s through RecordUsage (batches) on a metering server with the embedded
      ClickHouse (chDB) and the fsync'd local log; then checks ClickHouse holds every event.
  python -m bench.metering quota [--duration 10] [--concurrency 32]
      CheckQuota latency (p50/p99) at concurrency 32.
  python -m bench.metering onboarding [--tenants 10]
      create tenant → provisioned (retrieval namespace) → first answered question through
      Envoy, on the whole mesh.

Every loop is bounded in count and time. Calls go straight to the metering server with the
identity headers Envoy would set (ingest, quota) or through Envoy with JWTs (onboarding).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from copilot.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    metering_pb2,
    metering_pb2_grpc,
    tenant_pb2,
    tenant_pb2_grpc,
)
from copilot_cli.supervisor import Mesh, free_port, settings_on_free_ports
from servers.common.settings import Settings

OPERATOR = (("x-tenant-id", "platform"), ("x-user-id", "bench"), ("x-roles", "operator"))
TENANT = "bench-tenant"
WRITER = (("x-tenant-id", TENANT), ("x-user-id", "service:bench"), ("x-roles", "service"))
MEMBER = (("x-tenant-id", TENANT), ("x-user-id", "bench"), ("x-roles", "member"))
TIME_LIMIT_S = 300.0


def start_metering(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A metering server alone (no retrieval: tenants are created with onboarding off)."""
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "CLICKHOUSE_URL", "STRIPE_API_KEY")},
           "COPILOT_DATA_DIR": str(data_dir), "COPILOT_METERING_PORT": str(port), "COPILOT_ACCESS_LOG": "0",
           "COPILOT_METRICS_PORT_BASE": "0", "COPILOT_LOG_LEVEL": "WARNING"}
    log = open(data_dir / "metering.log", "wb")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen([sys.executable, "-m", "servers.metering"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return proc, address
            except grpc.RpcError:
                time.sleep(0.1)
    proc.kill()
    raise SystemExit("metering did not start:\n" + (data_dir / "metering.log").read_text()[-2000:])


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def seed_tenant(data_dir: Path) -> None:
    """Writes the bench tenant into the tenant store before the server starts (there is no
    retrieval service here for onboarding to provision)."""
    from datetime import UTC, datetime

    from servers.metering.tenants.domain import new_tenant
    from servers.metering.tenants.plans import Plan
    from servers.metering.tenants.store import SqliteTenantStore

    async def seed() -> None:
        store = SqliteTenantStore(data_dir / "metering" / "tenants.sqlite")
        await store.open()
        try:
            tenant = new_tenant(TENANT, "bench", Plan.ENTERPRISE, datetime.now(UTC))
            await store.create(replace(tenant, limits=replace(tenant.limits, requests_per_hour=2_000_000_000,
                                                                tokens_per_month=10**15)))
        finally:
            await store.close()

    asyncio.run(seed())


def bench_ingest(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="copilot-bench-metering-") as tmp:
        data_dir = Path(tmp)
        seed_tenant(data_dir)
        proc, address = start_metering(data_dir)
        batches = args.events // args.batch
        requests = [metering_pb2.RecordUsageRequest(events=[
            metering_pb2.UsageEvent(event_id=f"b{n}-{i}", kind=metering_pb2.USAGE_KIND_QUERY, model="gpt-4o-mini",
                                    requests=1, input_tokens=120, output_tokens=40,
                                    attributes={"request_id": f"r{n}-{i}"}) for i in range(args.batch)])
            for n in range(batches)]

        async def run() -> tuple[float, int]:
            async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
                stub = metering_pb2_grpc.MeteringServiceStub(ch)
                queue = iter(requests)
                recorded = 0
                deadline = time.monotonic() + TIME_LIMIT_S

                async def worker() -> None:
                    nonlocal recorded
                    for request in queue:
                        if time.monotonic() > deadline:
                            return
                        reply = await stub.RecordUsage(request, metadata=WRITER, timeout=30)
                        recorded += reply.recorded

                started = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(args.concurrency)))
                return time.perf_counter() - started, recorded

        try:
            elapsed, recorded = asyncio.run(run())
        finally:
            stopped = time.perf_counter()
            stop(proc)  # graceful: flushes what is still in the log
            drain = time.perf_counter() - stopped
        from servers.metering.storage import clickhouse
        from servers.metering.storage.clickhouse import ChdbBackend

        async def count() -> int:
            db = ChdbBackend(data_dir / "metering" / "chdb")
            await db.open()
            try:
                return int((await db.query(clickhouse.COUNT_SQL, {"tenant": TENANT}))[0][0])
            finally:
                await db.close()

        stored = asyncio.run(count())
        return {"benchmark": "ingest", "events": recorded, "batch": args.batch, "concurrency": args.concurrency,
                "seconds": round(elapsed, 2), "acknowledged_events_per_s": round(recorded / elapsed),
                "stored_in_clickhouse": stored, "stored_equals_acknowledged": stored == recorded,
                "events_per_s_into_clickhouse": round(stored / (elapsed + drain)),
                "shutdown_drain_s": round(drain, 2)}


def bench_quota(args: argparse.Namespace) -> dict[str, object]:
    """With the project's closed-loop load generator (bench/load.py), like bench.edge."""
    from bench.load import LoadSpec, run

    with tempfile.TemporaryDirectory(prefix="copilot-bench-metering-") as tmp:
        data_dir = Path(tmp)
        seed_tenant(data_dir)
        proc, address = start_metering(data_dir)
        try:
            with grpc.insecure_channel(address) as ch:  # some usage, so the counters are real
                metering_pb2_grpc.MeteringServiceStub(ch).RecordUsage(metering_pb2.RecordUsageRequest(events=[
                    metering_pb2.UsageEvent(event_id=f"w{i}", kind=metering_pb2.USAGE_KIND_QUERY, model="m",
                                            requests=1, input_tokens=10) for i in range(1000)]),
                    metadata=WRITER, timeout=30)
            result = run(LoadSpec(target=address, method="/copilot.v1.MeteringService/CheckQuota",
                                  request=metering_pb2.CheckQuotaRequest(estimated_tokens=500).SerializeToString(),
                                  metadata=MEMBER, concurrency=args.concurrency, duration_s=args.duration,
                                  warmup_s=2.0), processes=args.processes)
            # For scale on a busy machine: the cheapest RPC of the same server, same load.
            baseline = run(LoadSpec(target=address, method="/copilot.v1.TenantService/GetTenant",
                                    request=tenant_pb2.GetTenantRequest().SerializeToString(), metadata=MEMBER,
                                    concurrency=args.concurrency, duration_s=args.duration, warmup_s=2.0),
                           processes=args.processes)
        finally:
            stop(proc)
        return {"benchmark": "check_quota", "calls": result.calls, "errors": result.errors,
                "concurrency": args.concurrency, "rps": round(result.rps),
                "p50_ms": round(result.p50_ms, 2), "p99_ms": round(result.p99_ms, 2),
                "baseline_get_tenant": {"rps": round(baseline.rps), "p50_ms": round(baseline.p50_ms, 2),
                                        "p99_ms": round(baseline.p99_ms, 2)}}


def bench_onboarding(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="copilot-bench-onboarding-") as tmp:
        settings = replace(settings_on_free_ports(Settings.from_env(), Path(tmp)), tenant_cache_ttl_s=2.0)
        mesh = Mesh(settings, extra_env={"COPILOT_ACCESS_LOG": "0"})
        issuer = mesh.start(timeout_s=120)
        try:
            operator = (("authorization", f"Bearer {issuer.mint('platform', 'bench', ['operator'])}"),)

            async def run() -> list[dict[str, float]]:
                out: list[dict[str, float]] = []
                async with grpc.aio.insecure_channel(mesh.edge_address) as ch:
                    tenants = tenant_pb2_grpc.TenantServiceStub(ch)
                    answers = generation_pb2_grpc.GenerationServiceStub(ch)
                    for n in range(args.tenants):
                        tenant = f"onboard-{os.getpid()}-{n}"
                        member = (("authorization", f"Bearer {issuer.mint(tenant, 'first-user', ['member'])}"),)
                        t0 = time.perf_counter()
                        await tenants.CreateTenant(tenant_pb2.CreateTenantRequest(
                            tenant_id=tenant, plan=common_pb2.PLAN_PRO), metadata=operator, timeout=10)
                        t1 = time.perf_counter()
                        deadline = t1 + 30
                        while True:  # the edge may not know the tenant for a moment
                            try:
                                await answers.Answer(generation_pb2.AnswerRequest(
                                    question="What does this workspace know about data retention?"),
                                    metadata=member, timeout=10)
                                break
                            except grpc.aio.AioRpcError as exc:
                                if time.perf_counter() > deadline:
                                    raise
                                if exc.code() not in (grpc.StatusCode.PERMISSION_DENIED,
                                                      grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                      grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                                    raise
                                await asyncio.sleep(0.01)
                        t2 = time.perf_counter()
                        out.append({"provisioned_ms": (t1 - t0) * 1000, "first_answer_ms": (t2 - t1) * 1000,
                                    "total_ms": (t2 - t0) * 1000})
                return out

            runs = asyncio.run(run())
        finally:
            mesh.stop()
        totals = sorted(r["total_ms"] for r in runs)
        return {"benchmark": "onboarding", "tenants": len(runs),
                "provisioned_ms_median": round(statistics.median(r["provisioned_ms"] for r in runs), 1),
                "first_answer_ms_median": round(statistics.median(r["first_answer_ms"] for r in runs), 1),
                "total_ms_median": round(statistics.median(totals), 1), "total_ms_max": round(totals[-1], 1),
                "under_1s": all(t < 1000 for t in totals)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    ingest = sub.add_parser("ingest")
    ingest.add_argument("--events", type=int, default=200_000)
    ingest.add_argument("--batch", type=int, default=1000)
    ingest.add_argument("--concurrency", type=int, default=4)
    quota = sub.add_parser("quota")
    quota.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    quota.add_argument("--concurrency", type=int, default=32)
    quota.add_argument("--processes", type=int, default=1, help="load generator processes")
    onboarding = sub.add_parser("onboarding")
    onboarding.add_argument("--tenants", type=int, default=10)
    args = parser.parse_args()
    result = {"ingest": bench_ingest, "quota": bench_quota, "onboarding": bench_onboarding}[args.what](args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
