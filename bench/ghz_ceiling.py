"""ghz against the bare ceiling: the mesh's RPCs as fractions of what a bare grpc.aio server does.

  python -m bench.ghz_ceiling [--duration 10] [--warmup 2] [--concurrency 32] [--rows usage,answer]
                              [--profile answer]

Starts the mesh (embedded profile, extractive provider, access logs off) on free loopback
ports and, in the same run, a grpc.aio server with grpc.health.v1 only (bench/bare_health.py).
ghz drives each at the same concurrency (closed loop), by server reflection through the edge
(no --proto; the bare server has no reflection, so it gets bench/ghz/health.proto):

- H: grpc.health.v1 Check against the bare server, the ceiling every row is a ratio to;
- Health through the edge (Envoy, answered by the edge companion);
- BM25 Search through the edge with a tenant's token, and the same Search directly to
  retrieval (identity headers as Envoy would set them): the edge's share of a Search;
- GetUsage through the edge;
- Answer (extractive provider, basic retrieval) through the edge.

Each row: calls/s, p50, p99, ratio to H, and CPU per call summed over the mesh's processes
(Envoy, edge, generation, retrieval, metering; /proc utime+stime around the measured run),
also in bare calls' worth (CPU per call / the bare server's CPU per bare call), and the same
process by process. The load average is printed at the start and the end. Prints only;
writes nothing.

`--rows` measures only the named rows (health, search, search-direct, usage, answer; H is
always measured). `--profile ROW` runs that row once more after the measured ones, with py-spy
sampling every Python process of the mesh (bench/profile.py), and prints the top frames per
process: the profiled run is not one of the measured rows, so py-spy's cost is in none of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import grpc
from google.protobuf import field_mask_pb2

from bench import ghz
from bench.loadsuite import mesh_pids, ms, provision, table, tenant_questions, wait_for_edge
from bench.procs import load_average
from bench.profile import Profiler, find_py_spy
from copilot.v1 import tenant_pb2, tenant_pb2_grpc
from copilot_cli.supervisor import Mesh, free_port, settings_on_free_ports
from servers.common.identity import MEMBER, Identity
from servers.common.settings import Settings

TENANT = "ghz-ceiling"
# The load tenant's limits: above anything this machine can send, so the edge's rate-limit
# check still runs on every call but never refuses one (refusals would be measured instead).
UNLIMITED_RPS = 100_000
ROWS = ("health", "search", "search-direct", "usage", "answer")
PYTHON_PROCESSES = ("edge", "generation", "retrieval", "metering")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per row")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each row")
    parser.add_argument("--concurrency", type=int, default=32, help="ghz workers (closed loop), every row")
    parser.add_argument("--embedder", default="hash",
                        help="COPILOT_EMBEDDER for the mesh ('hash' ingests the tenant's corpus fast; "
                             "BM25 search and basic answers do not embed)")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"comma-separated rows to measure besides H, of {', '.join(ROWS)}")
    parser.add_argument("--profile", choices=ROWS, default=None,
                        help="after the measured rows, run this one again under py-spy and print the top frames")
    parser.add_argument("--native", action="store_true",
                        help="--profile with C frames too (py-spy pauses each process for every sample)")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.concurrency < 1 or args.warmup < 0:
        parser.error("--duration and --concurrency must be positive, --warmup not negative")
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if unknown := set(args.rows) - set(ROWS):
        parser.error(f"unknown rows {sorted(unknown)}: choose from {', '.join(ROWS)}")
    if args.profile and find_py_spy() is None:
        parser.error("--profile needs py-spy (pinned in requirements.lock)")
    return args


async def lift_limits(edge: str, operator: tuple[tuple[str, str], ...], settle_s: float) -> None:
    """Raises the load tenant's limits. The edge follows the tenant service's WatchTenants
    (at once) and re-lists every tenant each `settle_s` while the watch is down, so the new
    limits hold after `settle_s`; a call the old ones refused would show as an error anyway."""
    limits = tenant_pb2.TenantLimits(requests_per_second=UNLIMITED_RPS, requests_per_minute=60 * UNLIMITED_RPS,
                                     requests_per_hour=3600 * UNLIMITED_RPS)
    paths = ["limits.requests_per_second", "limits.requests_per_minute", "limits.requests_per_hour"]
    async with grpc.aio.insecure_channel(edge) as channel:
        updated = await tenant_pb2_grpc.TenantServiceStub(channel).UpdateTenant(
            tenant_pb2.UpdateTenantRequest(tenant=tenant_pb2.Tenant(tenant_id=TENANT, limits=limits),
                                           update_mask=field_mask_pb2.FieldMask(paths=paths)),
            metadata=operator, timeout=10)
    if updated.tenant.limits.requests_per_second != UNLIMITED_RPS:
        raise RuntimeError(f"{TENANT}'s limits were not raised: {updated.tenant.limits}")
    await asyncio.sleep(settle_s)


def row(m: ghz.Measured, bare: ghz.Measured) -> str:
    r = m.result
    errors = f"  errors {r.error_count} {r.errors}" if r.error_count else ""
    return (f"{m.label:58} {r.ok_rps:8,.0f}/s  p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms  "
            f"{m.ratio(bare):5.3f} H  CPU {m.cpu_ms_per_call:6.3f} ms/call = {m.cpu_worth(bare):5.1f} bare{errors}")


def by_process(m: ghz.Measured, bare: ghz.Measured) -> str:
    """Where a row's CPU per call went, process by process, in bare calls' worth too."""
    parts = [f"{name} {cpu:.3f} ms ({cpu / bare.cpu_ms_per_call:.1f} bare)" if bare.cpu_ms_per_call > 0
             else f"{name} {cpu:.3f} ms" for name, cpu in sorted(m.cpu_ms_by_process.items(), key=lambda kv: -kv[1])]
    return f"{'':58} CPU per call by process: " + ", ".join(parts)


def summary(measured: Sequence[ghz.Measured]) -> list[str]:
    """The run as a Markdown table (docs/benchmarks.md keeps one)."""
    bare = measured[0]
    return table(("RPC (ghz, closed loop)", "calls/s", "p50 ms", "p99 ms", "× H", "CPU ms per call (mesh)",
                  "bare calls' worth", "errors"),
                 [(m.label, f"{m.result.ok_rps:,.0f}", ms(m.result.p50_ms), ms(m.result.p99_ms), f"{m.ratio(bare):.3f}",
                   f"{m.cpu_ms_per_call:.3f}", f"{m.cpu_worth(bare):.1f}",
                   m.result.error_count if not m.result.errors else f"{m.result.error_count} {m.result.errors}")
                  for m in measured])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    binary = ghz.find_ghz()
    if binary is None:
        print(ghz.absent_reason(), file=sys.stderr)
        return 2
    print(f"load average at start: {load_average()}")
    print(f"ghz: {binary}; closed loop, concurrency {args.concurrency}, {args.duration:g} s measured per row "
          f"after {args.warmup:g} s warm-up", flush=True)
    measured: list[ghz.Measured] = []
    with tempfile.TemporaryDirectory(prefix="copilot-ghz-") as tmp:
        settings = settings_on_free_ports(Settings.from_env(), Path(tmp))
        mesh = Mesh(settings, extra_env={"COPILOT_ACCESS_LOG": "0", "COPILOT_EMBEDDER": args.embedder})
        issuer = mesh.start(timeout_s=120)
        try:
            edge = mesh.edge_address
            asyncio.run(provision(edge, issuer, [TENANT]))
            wait_for_edge(edge, issuer, [TENANT])
            member = (("authorization", f"Bearer {issuer.mint(TENANT, 'ghz', [MEMBER], ttl_s=3600)}"),)
            operator = (("authorization", f"Bearer {issuer.mint('platform', 'ghz-ceiling', ['operator'])}"),)
            asyncio.run(lift_limits(edge, operator, settings.tenant_cache_ttl_s + 1))
            measured = run_rows(args, mesh, settings, member)
        finally:
            mesh.stop()
    print()
    print("\n".join(summary(measured)))
    if {"search", "search-direct"} <= set(args.rows):
        edge_search, direct_search = (measured[1 + args.rows.index(r)] for r in ("search", "search-direct"))
        print(f"\nSearch through the edge / directly to retrieval: {edge_search.ratio(direct_search):.3f} of the "
              f"calls/s, {edge_search.cpu_ms_per_call / direct_search.cpu_ms_per_call:.2f}x the CPU per call")
    print(f"load average at end: {load_average()}")
    return 0


def run_rows(args: argparse.Namespace, mesh: Mesh, settings: Settings,
             member: tuple[tuple[str, str], ...]) -> list[ghz.Measured]:
    c, edge = str(args.concurrency), mesh.edge_address
    pids = mesh_pids(mesh)
    question = tenant_questions(TENANT)[0]
    token = ghz.metadata(member)
    direct = ghz.metadata(Identity(TENANT, "ghz", frozenset({MEMBER})).metadata())
    search = ["--call", "copilot.v1.RetrievalService.Search",
              "-d", json.dumps({"query": question, "top_k": 10, "mode": "SEARCH_MODE_BM25"})]
    rows: dict[str, tuple[str, list[str]]] = {
        "health": ("Health through the edge", ghz.health_args(edge, args.concurrency, proto=False)),
        "search": ("BM25 Search through the edge (token)", ["--insecure", *search, "-m", token, "-c", c, edge]),
        "search-direct": ("BM25 Search directly to retrieval", ["--insecure", *search, "-m", direct, "-c", c,
                                                                settings.address("retrieval")]),
        "usage": ("GetUsage through the edge (token)", ["--insecure", "--call", "copilot.v1.MeteringService.GetUsage",
                                                        "-d", "{}", "-m", token, "-c", c, edge]),
        "answer": ("Answer through the edge (extractive, basic retrieval)",
                   ["--insecure", "--call", "copilot.v1.GenerationService.Answer",
                    "-d", json.dumps({"question": question, "mode": "RETRIEVAL_MODE_BASIC"}), "-m", token,
                    "-c", c, edge]),
    }
    bare = ghz.bare_ceiling(f"{settings.host}:{free_port(settings.host)}", args.concurrency,
                            duration_s=args.duration, warmup_s=args.warmup)
    out = [bare]
    print(row(bare, bare), flush=True)
    for key in args.rows:
        label, ghz_args = rows[key]
        m = ghz.measure(label, ghz_args, pids, duration_s=args.duration, warmup_s=args.warmup)
        out.append(m)
        print(row(m, bare), flush=True)
        if len(m.cpu_ms_by_process) > 1:
            print(by_process(m, bare), flush=True)
    if args.profile:
        label, ghz_args = rows[args.profile]
        python = {name: pid for name, pid in pids.items() if name in PYTHON_PROCESSES}
        with Profiler(python, args.duration, native=args.native) as profiler:
            profiled = ghz.run([*ghz_args, "-z", f"{args.duration:g}s"], duration_s=args.duration)
        print(f"\n{label} under py-spy: {profiled.ok_rps:,.0f}/s, p50 {profiled.p50_ms:.2f} ms "
              f"(not a measured row: py-spy shares the cores)\n")
        print("\n".join(profiler.report()))
    return out


if __name__ == "__main__":
    sys.exit(main())
