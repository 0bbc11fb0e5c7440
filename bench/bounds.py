"""`make bench-bounds`: what a client that opens and abandons thousands of calls costs the mesh.

Starts the mesh (Envoy + the four services) on free loopback ports, measures each process's
resident memory, then opens `--calls` calls through the edge across a few tenants and
connections without reading or finishing them (uploads with one batch sent, streamed answers
never read, searches never awaited), holds them for `--hold` seconds, cancels them all, and
measures again, also after the mesh has served a round of normal calls. Printed: memory per
process before / while held / after, how the calls ended (by code), open streams per service
after, and whether the mesh still serves. Bounded in calls and time; loopback only.

  python -m bench.bounds [--calls 2000] [--tenants 10] [--hold 5]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc

from copilot.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
    tenant_pb2,
    tenant_pb2_grpc,
)
from copilot_cli.supervisor import Mesh, settings_on_free_ports
from servers.common.issuer import DevIssuer
from servers.common.settings import Settings

# The services that count open streams (the edge companion serves no copilot.v1 stream).
STREAMING_SERVICES = ("retrieval", "generation", "metering")
# Connections the calls are spread over (Envoy caps streams per connection).
CHANNELS = 8


def auth(issuer: DevIssuer, tenant: str, roles: tuple[str, ...] = ("member", "admin")) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {issuer.mint(tenant, 'bench', roles)}"),)


async def abandon_calls(edge: str, metadata: list[tuple[tuple[str, str]]], count: int,
                        hold_s: float = 1.0) -> Counter[str]:
    """Opens `count` calls through `edge` (round robin over the tenants' `metadata`): an upload
    with one batch sent, a streamed answer, a search; reads none of them; after `hold_s`
    cancels them all. Returns how each call had ended by then (OPEN if it had not)."""
    channels = [grpc.aio.insecure_channel(edge) for _ in range(CHANNELS)]
    calls: list[Any] = []
    writes: list[asyncio.Future[Any]] = []
    try:
        for i in range(count):
            channel, md = channels[i % CHANNELS], metadata[i % len(metadata)]
            kind = i % 3
            call: Any
            if kind == 0:
                call = retrieval_pb2_grpc.RetrievalServiceStub(channel).StreamIngestDocuments(
                    None, metadata=md, timeout=60)
                writes.append(asyncio.ensure_future(call.write(retrieval_pb2.StreamIngestDocumentsRequest())))
            elif kind == 1:
                call = generation_pb2_grpc.GenerationServiceStub(channel).StreamAnswer(
                    generation_pb2.StreamAnswerRequest(question=f"what does clause {i} require?"), metadata=md,
                    timeout=60)
            else:
                call = retrieval_pb2_grpc.RetrievalServiceStub(channel).Search(
                    retrieval_pb2.SearchRequest(query=f"clause {i}"), metadata=md, timeout=60)
            calls.append(call)
            if i % 100 == 99:
                await asyncio.sleep(0)  # let the calls start
        await asyncio.sleep(hold_s)
        outcomes: Counter[str] = Counter()
        for call in calls:
            outcomes[(await call.code()).name if call.done() else "OPEN"] += 1
        for call in calls:
            call.cancel()
        # A write to a stream cancelled (or refused) before it went out never completes.
        for write in writes:
            write.cancel()
        await asyncio.gather(*writes, return_exceptions=True)
        return outcomes
    finally:
        for channel in channels:
            await channel.close(None)


def rss_mib(pid: int) -> float:
    """Resident memory of a process (Linux /proc)."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else float("nan")


def open_streams(settings: Settings, service: str) -> float:
    """copilot_streams_open of one service, from its /metrics."""
    url = f"http://{settings.host}:{settings.metrics_port(service)}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    match = re.search(r"^copilot_streams_open (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


async def serves(edge: str, metadata: tuple[tuple[str, str]]) -> bool:
    """A search and a streamed answer through the edge both succeed."""
    async with grpc.aio.insecure_channel(edge) as channel:
        await retrieval_pb2_grpc.RetrievalServiceStub(channel).Search(
            retrieval_pb2.SearchRequest(query="retention"), metadata=metadata, timeout=30)
        answer = generation_pb2_grpc.GenerationServiceStub(channel).StreamAnswer(
            generation_pb2.StreamAnswerRequest(question="what about retention?"), metadata=metadata, timeout=60)
        return any([m async for m in answer])


async def run(calls: int, tenants: int, hold_s: float) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-bounds-") as tmp:
        settings = replace(settings_on_free_ports(Settings.from_env(), Path(tmp)), tenant_cache_ttl_s=1.0)
        mesh = Mesh(settings)
        issuer = mesh.start(timeout_s=120)
        try:
            pids = {name: proc.pid for name, proc in mesh.processes.items()}
            edge = mesh.edge_address
            async with grpc.aio.insecure_channel(edge) as channel:
                stub = tenant_pb2_grpc.TenantServiceStub(channel)
                operator = auth(issuer, "platform", ("operator",))
                ids = [f"bench-bounds-{i}" for i in range(tenants)]
                for tenant in ids:
                    await stub.CreateTenant(tenant_pb2.CreateTenantRequest(
                        tenant_id=tenant, display_name=tenant, plan=common_pb2.PLAN_ENTERPRISE),
                        metadata=operator, timeout=30)
            metadata = [auth(issuer, tenant) for tenant in ids]
            await serves(edge, metadata[0])
            before = {name: rss_mib(pid) for name, pid in pids.items()}
            started = time.perf_counter()
            held: dict[str, float] = {}

            async def measure_while_held() -> None:
                await asyncio.sleep(max(0.0, hold_s - 0.5))
                held.update({name: rss_mib(pid) for name, pid in pids.items()})

            outcomes, _ = await asyncio.gather(abandon_calls(edge, metadata, calls, hold_s), measure_while_held())
            elapsed = time.perf_counter() - started
            await asyncio.sleep(2)  # let the services see the cancellations
            after_cancel = {name: rss_mib(pid) for name, pid in pids.items()}
            ok = await serves(edge, metadata[0])
            after = {name: rss_mib(pid) for name, pid in pids.items()}
            streams = {service: open_streams(settings, service) for service in STREAMING_SERVICES}
        finally:
            mesh.stop()

    print(f"{calls} calls opened and abandoned through the edge ({tenants} tenants, {CHANNELS} connections, "
          f"held {hold_s:g} s; {elapsed:.1f} s in all)")
    print("how the calls had ended when cancelled: " + ", ".join(f"{k} {v}" for k, v in outcomes.most_common()))
    print(f"{'process':<12}{'RSS before':>12}{'held':>10}{'cancelled':>11}{'served':>10}  (MiB)")
    for name in pids:
        print(f"{name:<12}{before[name]:>12.1f}{held.get(name, float('nan')):>10.1f}"
              f"{after_cancel[name]:>11.1f}{after[name]:>10.1f}")
    print("open streams after: " + ", ".join(f"{s} {n:g}" for s, n in streams.items()))
    print(f"mesh serves afterwards: {'yes' if ok else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--hold", type=float, default=5.0, help="seconds the calls are held open")
    args = parser.parse_args()
    if not 1 <= args.calls <= 20_000:
        parser.error("--calls must be 1..20000")
    asyncio.run(run(args.calls, max(1, args.tenants), args.hold))


if __name__ == "__main__":
    main()
