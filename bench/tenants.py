"""`make bench-tenants`: many tenants on one retrieval server with the embedded store.

  python -m bench.tenants [--tenants 10000] [--docs 3] [--concurrency 8] [--max-minutes 15]
                          [--max-open-tenants 256] [--cold-samples 200]

Starts one retrieval server (`python -m servers.retrieval`, its own process, the embedded
SQLite store in a temporary data dir) and talks to it over gRPC with the identity headers
Envoy would set (the edge is not what is measured here). The embedder is `hash`
(COPILOT_EMBEDDER=hash: feature hashing, no model) so that the model's cost does not hide
the store's; hybrid search still runs, over hash vectors. Query result and embedding
caches are off so every query does the full work.

1. Provisions N tenants (ProvisionTenant, then IngestDocuments of a few short documents),
   `--concurrency` tenants at a time: per-tenant provisioning and ingest latency p50/p99.
2. After 1k, 5k and N tenants (and at the end): the server's resident memory (VmRSS from
   /proc), its open tenants (SQLite files it holds open, from /proc/<pid>/fd) and the data
   dir's size on disk.
3. First query of a cold tenant (provisioned long ago, closed by the LRU since) against a
   second query of the same tenant, now warm: latency p50/p99, one query at a time.
4. `--sequential` more tenants provisioned one at a time: per-tenant latency without the
   queueing that step 1's concurrency adds.

Memory should follow the active set (COPILOT_RETRIEVAL_MAX_OPEN_TENANTS), not N. The run
stops provisioning after --max-minutes and reports what it reached. Prints one JSON object
per phase and a summary JSON object on the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import grpc

from copilot.v1 import retrieval_pb2 as pb
from copilot.v1 import retrieval_pb2_grpc as pb_grpc
from copilot_cli.supervisor import free_port, settings_env
from servers.common.channels import CLIENT_OPTIONS
from servers.common.settings import Settings

CHECKPOINTS = (1_000, 5_000)
TOPICS = ("suspicious transactions", "customer due diligence", "data retention", "market abuse",
          "outsourcing risk", "capital requirements", "complaints handling", "record keeping")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(percentile(values, 50), 2), "p99_ms": round(percentile(values, 99), 2),
            "n": len(values)}


def tenant_name(index: int) -> str:
    return f"bench-t{index:05d}"


def metadata(tenant: str, roles: str) -> tuple[tuple[str, str], ...]:
    return (("x-tenant-id", tenant), ("x-user-id", "bench"), ("x-roles", roles))


def corpus(index: int, docs: int) -> list[pb.Document]:
    rng = random.Random(index)
    out = []
    for d in range(docs):
        topic = rng.choice(TOPICS)
        text = (f"Policy {d} of tenant {index}: firms must keep {topic} procedures documented. "
                f"The {topic} owner reviews controls every {rng.randint(1, 12)} months and reports "
                f"breaches to the board within {rng.randint(1, 30)} days.")
        out.append(pb.Document(document_id=f"doc-{d}", title=f"{topic.title()} policy", text=text,
                               source="bench", metadata={"topic": topic.split()[0]}))
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def open_tenants(pid: int) -> int:
    """Tenant databases the server holds open: its file descriptors on `*.sqlite` files."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).endswith(".sqlite"):
                count += 1
        except OSError:
            continue
    return count


def disk_mb(path: Path) -> float:
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return round(total / 1024 / 1024, 1)


class Server:
    """One retrieval server process on a free port."""

    def __init__(self, data_dir: Path, max_open_tenants: int) -> None:
        self.settings = replace(Settings.from_env(), data_dir=data_dir, retrieval_port=free_port(),
                                metrics_port_base=0)
        env = {**os.environ, **settings_env(self.settings), "COPILOT_EMBEDDER": "hash", "COPILOT_ACCESS_LOG": "0",
               "COPILOT_LOG_LEVEL": "WARNING", "COPILOT_STORE": "embedded",
               "COPILOT_RETRIEVAL_MAX_OPEN_TENANTS": str(max_open_tenants),
               "COPILOT_RETRIEVAL_RESULT_CACHE": "0", "COPILOT_RETRIEVAL_EMBEDDING_CACHE": "0",
               # No metering server here to take the audit trail.
               "COPILOT_AUDIT": "0", "OTEL_EXPORTER_OTLP_ENDPOINT": ""}
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log = data_dir / "retrieval.log"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "servers.retrieval"], env=env, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        self.address = self.settings.address("retrieval")

    async def wait_serving(self, stub: pb_grpc.RetrievalServiceAsyncStub, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"retrieval exited ({self.process.returncode}): {self.log.read_text()[-2000:]}")
            try:
                await stub.ConfigureSearch(pb.ConfigureSearchRequest(), metadata=metadata("bench-probe", "member"),
                                           timeout=2)
                return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.2)
        raise RuntimeError(f"retrieval not answering after {timeout_s:.0f}s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


async def provision_all(stub: pb_grpc.RetrievalServiceAsyncStub, server: Server, args: argparse.Namespace,
                        tenants_dir: Path, report: list[dict[str, object]]) -> tuple[int, list[float], list[float]]:
    provision_ms: list[float] = []
    ingest_ms: list[float] = []
    deadline = time.monotonic() + args.max_minutes * 60
    next_index = 0
    done = 0
    checkpoints = sorted({c for c in CHECKPOINTS if c < args.tenants} | {args.tenants})
    started = time.perf_counter()

    async def worker(limit: int) -> None:
        nonlocal next_index, done
        while next_index < limit and time.monotonic() < deadline:
            index = next_index
            next_index += 1
            tenant = tenant_name(index)
            t0 = time.perf_counter()
            await stub.ProvisionTenant(pb.ProvisionTenantRequest(), metadata=metadata(tenant, "service"), timeout=30)
            t1 = time.perf_counter()
            response = await stub.IngestDocuments(pb.IngestDocumentsRequest(documents=corpus(index, args.docs)),
                                                  metadata=metadata(tenant, "admin"), timeout=30)
            t2 = time.perf_counter()
            assert len(response.results) == args.docs
            provision_ms.append((t1 - t0) * 1000)
            ingest_ms.append((t2 - t1) * 1000)
            done += 1

    while checkpoints and time.monotonic() < deadline:
        target = checkpoints.pop(0)
        await asyncio.gather(*(worker(target) for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - started
        phase = {"phase": "provisioned", "tenants": done, "elapsed_s": round(elapsed, 1),
                 "tenants_per_s": round(done / elapsed, 1) if elapsed else 0.0,
                 "rss_mb": rss_mb(server.process.pid), "open_tenants": open_tenants(server.process.pid),
                 "disk_mb": disk_mb(tenants_dir)}
        report.append(phase)
        print(json.dumps(phase), flush=True)
    return done, provision_ms, ingest_ms


async def cold_and_warm(stub: pb_grpc.RetrievalServiceAsyncStub, done: int, samples: int,
                        max_open_tenants: int) -> tuple[list[float], list[float]]:
    # The oldest tenants: with N well above the LRU size they were closed long ago.
    pool = list(range(max(0, min(done - max_open_tenants, done // 2))))
    chosen = random.Random(11).sample(pool, min(samples, len(pool)))
    cold: list[float] = []
    warm: list[float] = []
    for index in chosen:
        tenant = tenant_name(index)
        request = pb.SearchRequest(query="breaches reported to the board", mode=pb.SEARCH_MODE_HYBRID, top_k=5)
        for times in (cold, warm):
            t0 = time.perf_counter()
            response = await stub.Search(request, metadata=metadata(tenant, "member"), timeout=30)
            times.append((time.perf_counter() - t0) * 1000)
            assert response.hits and all(h.source == "bench" for h in response.hits)
    return cold, warm


async def sequential(stub: pb_grpc.RetrievalServiceAsyncStub, first: int, count: int,
                     docs: int) -> tuple[list[float], list[float]]:
    """New tenants one at a time on the loaded server: latency without queueing behind others."""
    provision_ms: list[float] = []
    ingest_ms: list[float] = []
    for index in range(first, first + count):
        tenant = tenant_name(index)
        t0 = time.perf_counter()
        await stub.ProvisionTenant(pb.ProvisionTenantRequest(), metadata=metadata(tenant, "service"), timeout=30)
        t1 = time.perf_counter()
        await stub.IngestDocuments(pb.IngestDocumentsRequest(documents=corpus(index, docs)),
                                   metadata=metadata(tenant, "admin"), timeout=30)
        provision_ms.append((t1 - t0) * 1000)
        ingest_ms.append((time.perf_counter() - t1) * 1000)
    return provision_ms, ingest_ms


async def bench(args: argparse.Namespace) -> dict[str, object]:
    report: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="copilot-bench-tenants-") as tmp:
        server = Server(Path(tmp), args.max_open_tenants)
        channel = grpc.aio.insecure_channel(server.address, options=CLIENT_OPTIONS)
        stub: pb_grpc.RetrievalServiceAsyncStub = pb_grpc.RetrievalServiceStub(channel)
        tenants_dir = Path(tmp) / "retrieval" / "tenants"
        try:
            await server.wait_serving(stub)
            idle = {"phase": "started", "rss_mb": rss_mb(server.process.pid)}
            print(json.dumps(idle), flush=True)
            done, provision_ms, ingest_ms = await provision_all(stub, server, args, tenants_dir, report)
            cold, warm = await cold_and_warm(stub, done, args.cold_samples, args.max_open_tenants)
            seq_provision, seq_ingest = await sequential(stub, args.tenants, args.sequential, args.docs)
            final = {"phase": "after_queries", "rss_mb": rss_mb(server.process.pid),
                     "open_tenants": open_tenants(server.process.pid), "disk_mb": disk_mb(tenants_dir)}
            print(json.dumps(final), flush=True)
        finally:
            await channel.close(None)
            server.stop()
    return {
        "bench": "tenants", "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {platform.python_version()}",
        "embedder": "hash", "store": "embedded", "target_tenants": args.tenants, "tenants": done,
        "docs_per_tenant": args.docs, "concurrency": args.concurrency, "max_open_tenants": args.max_open_tenants,
        "rss_idle_mb": idle["rss_mb"],
        "provision": summary(provision_ms), "ingest": summary(ingest_ms),
        "provision_plus_ingest": summary([a + b for a, b in zip(provision_ms, ingest_ms, strict=True)]),
        "sequential_provision": summary(seq_provision), "sequential_ingest": summary(seq_ingest),
        "checkpoints": report, "cold_first_query": summary(cold), "warm_query": summary(warm),
        "after_queries": final,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--docs", type=int, default=3, help="documents per tenant")
    parser.add_argument("--concurrency", type=int, default=8, help="tenants provisioned at a time")
    parser.add_argument("--max-minutes", type=float, default=15.0, help="stop provisioning after this long")
    parser.add_argument("--max-open-tenants", type=int, default=256, help="the server's LRU of open tenants")
    parser.add_argument("--cold-samples", type=int, default=200, help="cold tenants queried (then warm)")
    parser.add_argument("--sequential", type=int, default=100,
                        help="extra tenants provisioned one at a time at the end (uncontended latency)")
    args = parser.parse_args()
    if args.tenants < 1 or args.docs < 1 or args.concurrency < 1:
        parser.error("--tenants, --docs and --concurrency must be at least 1")
    print(json.dumps(asyncio.run(bench(args))), flush=True)


if __name__ == "__main__":
    main()
