"""`make bench-load`: the load suite (issue 7, item 5), one command.

Starts the mesh (embedded profile, extractive provider, access logs off) on free ports,
creates tenants each with its own small corpus (ingested through the edge), and measures,
all in the same run:

1. the bare gRPC ceiling H: grpc.health.v1 Check against a grpc.aio server with nothing
   else (bench/bare_health.py), by ghz at concurrency 32 (the project's generator when ghz
   is absent); then the same Check against the edge companion directly, through Envoy, and
   against the generation server (with the mesh's interceptors). Every figure of the
   report is also given as a fraction of H;
2. closed loop at several concurrencies: a mix of Answer, StreamAnswer, Search and GetUsage
   over every tenant, and Answer alone;
3. open loop (fixed arrival rate, latency from the scheduled send time, so a slow answer
   cannot hide the queue behind it): Answer at increasing rates, to find the highest rate
   sustained with p99 <= 150 ms and no error; then ghz runs bench/ghz/answer.json at the
   sustained rate (one tenant's token), when ghz is found (bench/ghz.py: ../shared/tools/ghz
   beside the repository, else PATH);
4. the tenant-count cost curve (10 -> 100 -> 1,000 tenants): provisioning time, RSS of each
   process, CPU per answer, p50/p99 and the highest sustained rate;
5. a bounded soak: the mix at a fixed rate for --soak-minutes, sampling RSS and open file
   descriptors of every mesh process (Envoy, edge, generation, retrieval, metering).

Writes docs/benchmarks.md (machine details and tables) and prints the same.

  python -m bench.loadsuite [--tenants 100] [--soak-minutes 10] [--quick] [--out docs/benchmarks.md]
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
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from bench import ghz
from bench.answer import ACTIONS, SUBJECTS, corpus
from bench.bare_health import BareHealthServer
from bench.load import Call, MixResult, MixSpec, Stats, run_mix
from bench.procs import ProcSample, load_average, snapshot
from copilot.v1 import (
    common_pb2,
    generation_pb2,
    metering_pb2,
    retrieval_pb2,
    retrieval_pb2_grpc,
    tenant_pb2,
    tenant_pb2_grpc,
)
from copilot_cli.supervisor import Mesh, envoy_binary, free_port, settings_on_free_ports
from servers.common.settings import Settings

P99_TARGET_MS = 150.0
MIN_RATE = 5.0  # the open-loop search's floor
HEALTH = "/grpc.health.v1.Health/Check"
ANSWER = "/copilot.v1.GenerationService/Answer"
STREAM_ANSWER = "/copilot.v1.GenerationService/StreamAnswer"
SEARCH = "/copilot.v1.RetrievalService/Search"
GET_USAGE = "/copilot.v1.MeteringService/GetUsage"
# The mix's shares, in calls out of 20.
MIX = (("Answer", 10), ("StreamAnswer", 4), ("Search", 5), ("GetUsage", 1))
PROCESS_NAMES = ("envoy", "edge", "generation", "retrieval", "metering")
PROVISION_CONCURRENCY = 4
NOTES_MARKER = "<!-- notes below this line are kept when the suite rewrites this file -->"
IDLE_S = 5.0  # seconds of no load over which background CPU is measured


# --- machine and processes --------------------------------------------------------------

def machine_details() -> dict[str, str]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    try:
        envoy = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True, timeout=20).stdout
        envoy_version = envoy.strip().split("version:", 1)[-1].strip().split("/")[1] if "/" in envoy else envoy.strip()
    except Exception as exc:  # reported, not fatal
        envoy_version = f"unknown ({exc})"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu, "cores": str(os.cpu_count()), "ram": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(), "python": platform.python_version(), "envoy": envoy_version,
        "grpcio": grpc.__version__,
        "load_average_at_start": load_average(),
        "ghz": ghz.find_ghz() or "not found (the project's generator ran every stage)",
    }


def mesh_pids(mesh: Mesh) -> dict[str, int]:
    return {name: mesh.processes[name].pid for name in PROCESS_NAMES if name in mesh.processes}


class Sampler:
    """Samples every mesh process every `interval_s` from a thread until stopped."""

    def __init__(self, pids: dict[str, int], interval_s: float) -> None:
        self._pids, self._interval = pids, interval_s
        self.samples: list[tuple[float, dict[str, ProcSample]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="proc-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - self._start, snapshot(self._pids)))
            self._stop.wait(self._interval)

    def __enter__(self) -> Sampler:
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.samples.append((time.monotonic() - self._start, snapshot(self._pids)))


# --- tenants and their corpora -------------------------------------------------------------

def tenant_ids(start: int, stop: int) -> list[str]:
    return [f"load-{i:04d}" for i in range(start, stop)]


def tenant_corpus(tenant: str, docs: int = 2, sections: int = 4) -> list[retrieval_pb2.Document]:
    """A small corpus of the tenant's own: `docs` policies of `sections` passages."""
    return corpus(docs, sections, owner=tenant)


def tenant_questions(tenant: str, n: int = 8) -> list[str]:
    rnd = random.Random(f"q:{tenant}")
    return [f"Who must {rnd.choice(ACTIONS)} {rnd.choice(SUBJECTS)} cases and within what period?" for _ in range(n)]


@dataclass
class Provisioned:
    tenants: int
    seconds: float
    create_s: float
    ingest_s: float
    passages: int


async def provision(edge: str, issuer: Any, tenants: Sequence[str], concurrency: int = PROVISION_CONCURRENCY,
                    ) -> Provisioned:
    """Creates the tenants (enterprise plan: its limits are above what this machine can
    send per tenant) and ingests each one's corpus, through the edge."""
    operator = (("authorization", f"Bearer {issuer.mint('platform', 'loadsuite', ['operator'])}"),)
    passages = 0
    create_s = ingest_s = 0.0
    gate = asyncio.Semaphore(concurrency)
    started = time.perf_counter()
    async with grpc.aio.insecure_channel(edge) as channel:
        admin = tenant_pb2_grpc.TenantServiceStub(channel)
        retrieval = retrieval_pb2_grpc.RetrievalServiceStub(channel)

        async def one(tenant: str) -> None:
            nonlocal passages, create_s, ingest_s
            async with gate:
                t0 = time.perf_counter()
                await admin.CreateTenant(tenant_pb2.CreateTenantRequest(
                    tenant_id=tenant, display_name=tenant, plan=common_pb2.PLAN_ENTERPRISE),
                    metadata=operator, timeout=30)
                t1 = time.perf_counter()
                token = issuer.mint(tenant, "loadsuite-admin", ["member", "admin"])
                response = await retrieval.IngestDocuments(
                    retrieval_pb2.IngestDocumentsRequest(documents=tenant_corpus(tenant)),
                    metadata=(("authorization", f"Bearer {token}"),), timeout=300)
                t2 = time.perf_counter()
                passages += sum(r.chunks for r in response.results)
                create_s += t1 - t0
                ingest_s += t2 - t1

        await asyncio.gather(*(one(t) for t in tenants))
    return Provisioned(tenants=len(tenants), seconds=time.perf_counter() - started, create_s=create_s,
                       ingest_s=ingest_s, passages=passages)


def wait_for_edge(edge: str, issuer: Any, tenants: Sequence[str], timeout_s: float = 30.0) -> None:
    """Until the edge's limiter knows the newest tenant (its limits, not the default's)."""
    token = issuer.mint(tenants[-1], "loadsuite", ["member"])
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(edge) as channel:
        call = channel.unary_unary(GET_USAGE, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        while time.monotonic() < deadline:
            try:
                call(metering_pb2.GetUsageRequest().SerializeToString(),
                     metadata=(("authorization", f"Bearer {token}"),), timeout=5)
                return
            except grpc.RpcError:
                time.sleep(0.5)


# --- the calls ---------------------------------------------------------------------------

def member_metadata(issuer: Any, tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {issuer.mint(tenant, f'user-{tenant}', ['member'], ttl_s=4 * 3600)}"),)


def build_calls(issuer: Any, tenants: Sequence[str], kinds: Sequence[tuple[str, int]]) -> tuple[Call, ...]:
    """Each tenant's calls of each kind (in the given shares), interleaved tenant by tenant so
    any stretch of the cycle spreads over many tenants."""
    basic = common_pb2.RETRIEVAL_MODE_BASIC
    per_tenant: list[list[Call]] = []
    for tenant in tenants:
        md = member_metadata(issuer, tenant)
        questions = tenant_questions(tenant)
        calls: list[Call] = []
        for kind, share in kinds:
            for i in range(share):
                q = questions[i % len(questions)]
                if kind == "Answer":
                    calls.append(Call(kind, ANSWER, generation_pb2.AnswerRequest(
                        question=q, mode=basic).SerializeToString(), md))
                elif kind == "StreamAnswer":
                    calls.append(Call(kind, STREAM_ANSWER, generation_pb2.StreamAnswerRequest(
                        question=q, mode=basic).SerializeToString(), md, streaming=True))
                elif kind == "Search":
                    calls.append(Call(kind, SEARCH, retrieval_pb2.SearchRequest(
                        query=q, top_k=10, mode=retrieval_pb2.SEARCH_MODE_BM25).SerializeToString(), md))
                elif kind == "GetUsage":
                    calls.append(Call(kind, GET_USAGE, metering_pb2.GetUsageRequest().SerializeToString(), md))
                else:
                    raise ValueError(kind)
        random.Random(tenant).shuffle(calls)
        per_tenant.append(calls)
    width = max(len(c) for c in per_tenant)
    return tuple(c[i] for i in range(width) for c in per_tenant if i < len(c))


def health_calls(label: str) -> tuple[Call, ...]:
    return (Call(label, HEALTH, health_pb2.HealthCheckRequest(service="").SerializeToString(), ()),)


# --- stages ------------------------------------------------------------------------------

@dataclass
class Step:
    rate: float
    result: MixResult
    ok: bool


@dataclass
class Search:
    steps: list[Step] = field(default_factory=list)

    @property
    def sustained(self) -> Step | None:
        passed = [s for s in self.steps if s.ok]
        return max(passed, key=lambda s: s.rate) if passed else None


def passes(result: MixResult, rate: float) -> bool:
    """Sustained: p99 within the target, no error at all, and (nearly) every scheduled call
    answered inside the window."""
    t = result.total
    return t.error_count == 0 and t.ok > 0 and t.p99_ms <= P99_TARGET_MS and t.ok >= 0.97 * rate * result.duration_s


def find_sustained(target: str, calls: tuple[Call, ...], start: float, step: float, duration_s: float,
                   warmup_s: float, max_steps: int, processes: int, log: Callable[[str], None],
                   refine: bool = True) -> Search:
    """Open loop at start, start+step, ... until a rate fails; then (refine) once halfway
    between the last pass and the first failure. When even `start` fails (a busy machine),
    halves it until a rate passes, so there is always a figure."""
    search = Search()
    rate = start
    for _ in range(max_steps):
        result = run_open(target, calls, rate, duration_s, warmup_s, processes)
        ok = passes(result, rate)
        search.steps.append(Step(rate, result, ok))
        log(f"  open loop {rate:6.0f}/s: {fmt_stats(result.total)}  {'PASS' if ok else 'fail'}")
        time.sleep(3)  # a failing step leaves queues behind: let them drain
        if not ok and search.sustained is None and rate / 2 >= MIN_RATE:
            rate = round(rate / 2)
            continue
        if not ok:
            break
        rate += step
        if any(not s.ok and s.rate <= rate for s in search.steps):
            break  # the next rate up already failed: refine below instead
    passed, failed = search.sustained, [s for s in search.steps if not s.ok]
    above = sorted((s for s in failed if passed is not None and s.rate > passed.rate), key=lambda s: s.rate)
    if refine and passed is not None and above and above[0].rate - passed.rate > step / 4:
        rate = round((passed.rate + above[0].rate) / 2)
        result = run_open(target, calls, rate, duration_s, warmup_s, processes)
        ok = passes(result, rate)
        search.steps.append(Step(rate, result, ok))
        log(f"  open loop {rate:6.0f}/s: {fmt_stats(result.total)}  {'PASS' if ok else 'fail'}")
        time.sleep(3)
    return search


def run_open(target: str, calls: tuple[Call, ...], rate: float, duration_s: float, warmup_s: float,
             processes: int) -> MixResult:
    return run_mix(MixSpec(target=target, calls=calls, rate=rate, duration_s=duration_s, warmup_s=warmup_s),
                   processes)


def run_closed(target: str, calls: tuple[Call, ...], concurrency: int, duration_s: float, warmup_s: float,
               processes: int) -> MixResult:
    return run_mix(MixSpec(target=target, calls=calls, concurrency=concurrency, duration_s=duration_s,
                           warmup_s=warmup_s), processes)


def ghz_open_loop(edge: str, token: str, question: str, rate: int, duration_s: float) -> ghz.GhzResult | str:
    """bench/ghz/answer.json (Answer, open loop) at `rate` for `duration_s` with one tenant's
    token: the shipped config as a user runs it, with the target and load given here. What
    went wrong instead of a result when ghz fails."""
    args = ["--config", "answer.json", "-m", ghz.metadata((("authorization", f"Bearer {token}"),)),
            "-d", json.dumps({"question": question, "mode": "RETRIEVAL_MODE_BASIC"}), "--rps", str(rate),
            "-z", f"{duration_s:g}s", edge]
    try:
        return ghz.run(args, duration_s=duration_s, cwd=ghz.CONFIGS)
    except ghz.GhzError as exc:
        return str(exc)


@dataclass(frozen=True)
class CeilingRow:
    label: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: str


def health_ceiling(label: str, target: str, opts: Options, *, bare: bool) -> CeilingRow:
    """grpc.health.v1 Check at `target`, closed loop: by ghz when found (by reflection, or
    from bench/ghz/health.proto for the bare server, which has none), else by the project's
    generator."""
    if ghz.find_ghz():
        r = ghz.measure(label, ghz.health_args(target, opts.ceiling_concurrency, proto=bare), {},
                        duration_s=opts.duration_s, warmup_s=opts.warmup_s).result
        return CeilingRow(label, r.ok_rps, r.p50_ms, r.p99_ms, ghz_errors_cell(r))
    m = run_closed(target, health_calls(label), opts.ceiling_concurrency, opts.duration_s, opts.warmup_s,
                   opts.processes).total
    return CeilingRow(label, m.rps, m.p50_ms, m.p99_ms, errors_cell(m))


def bare_ceiling(host: str, opts: Options) -> CeilingRow:
    """H: the bare grpc.aio server (grpc.health.v1 only, no interceptors), in its own process."""
    address = f"{host}:{free_port(host)}"
    with BareHealthServer(address):
        return health_ceiling("bare grpc.aio server, grpc.health.v1 only (H)", address, opts, bare=True)


def cpu_per_call(before: dict[str, ProcSample], after: dict[str, ProcSample], calls: int) -> dict[str, float]:
    """CPU milliseconds per call of each process between two snapshots."""
    if calls <= 0:
        return {}
    return {name: (after[name].cpu_s - before[name].cpu_s) * 1000 / calls for name in after if name in before}


def closed_with_cpu(target: str, calls: tuple[Call, ...], concurrency: int, opts: Options,
                    pids: dict[str, int]) -> tuple[MixResult, dict[str, float]]:
    """A closed-loop run and the mesh's CPU per call over it. The snapshots also cover the
    warm-up, at the same load: the measured window's calls are scaled to the whole run."""
    before, t0 = snapshot(pids), time.perf_counter()
    result = run_closed(target, calls, concurrency, opts.duration_s, opts.warmup_s, opts.processes)
    after, elapsed = snapshot(pids), time.perf_counter() - t0
    n = (result.total.ok + result.total.error_count) * elapsed / opts.duration_s
    return result, cpu_per_call(before, after, round(n))


# --- formatting ----------------------------------------------------------------------------

def fmt_stats(s: Stats) -> str:
    errs = f"errors {s.error_count} {s.errors}" if s.error_count else "errors 0"
    return f"{s.rps:8.1f} ok/s  p50 {s.p50_ms:7.2f}  p99 {s.p99_ms:7.2f}  max {s.max_ms:7.1f} ms  {errs}"


def ms(value: float) -> str:
    return "–" if value != value else f"{value:.1f}"  # NaN: no sample


def mib(kb: int) -> str:
    return f"{kb / 1024:.0f}"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def of_h(rps: float, h: float) -> str:
    """A rate as a fraction of the bare ceiling H."""
    return f"{rps / h:.3f}" if h > 0 and rps == rps else "–"


def ghz_errors_cell(r: ghz.GhzResult) -> str:
    if not r.error_count:
        return "0"
    return f"{r.error_count} ({', '.join(f'{k} {v}' for k, v in sorted(r.errors.items()))})"


def errors_cell(s: Stats) -> str:
    if not s.error_count:
        return "0"
    return f"{s.error_count} ({', '.join(f'{k} {v}' for k, v in sorted(s.errors.items()))})"


# --- the suite -----------------------------------------------------------------------------

@dataclass
class Options:
    tenants: int
    curve: tuple[int, ...]
    soak_minutes: float
    concurrency: tuple[int, ...]
    duration_s: float
    warmup_s: float
    step_duration_s: float
    start_rate: float
    step_rate: float
    max_steps: int
    ceiling_concurrency: int
    processes: int
    soak_rate: float
    sample_s: float
    out: Path | None
    quick: bool
    env: dict[str, str]


def parse(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=100, help="tenants of the main stages")
    parser.add_argument("--curve", default="10,100,1000", help="tenant counts of the cost curve ('' to skip)")
    parser.add_argument("--soak-minutes", type=float, default=10.0, help="0 skips the soak")
    parser.add_argument("--concurrency", default="1,8,32", help="closed-loop concurrencies")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per closed-loop level")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--step-duration", type=float, default=10.0, help="measured seconds per open-loop rate")
    parser.add_argument("--start-rate", type=float, default=50.0, help="first open-loop rate (Answer/s)")
    parser.add_argument("--step-rate", type=float, default=25.0)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--ceiling-concurrency", type=int, default=32)
    parser.add_argument("--processes", type=int, default=1, help="load generator processes")
    parser.add_argument("--soak-rate", type=float, default=0.0,
                        help="soak arrival rate (default: 70%% of the sustained Answer rate)")
    parser.add_argument("--sample-every", type=float, default=5.0, help="soak sampling interval, seconds")
    parser.add_argument("--out", default="docs/benchmarks.md", help="report file ('' to only print)")
    parser.add_argument("--embedder", default="",
                        help="COPILOT_EMBEDDER for the mesh (default: the embedded profile's, MiniLM when "
                             "installed; 'hash' makes provisioning 1,000 tenants fast; basic-mode answers "
                             "do not embed either way)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the mesh (e.g. COPILOT_AUDIT=0), repeatable")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 10 tenants, short stages, no 1,000-tenant step, 0.5 min soak")
    args = parser.parse_args(argv)
    if any("=" not in kv for kv in args.env):
        parser.error("--env takes KEY=VALUE")
    opts = Options(
        tenants=args.tenants, curve=tuple(int(c) for c in args.curve.split(",") if c.strip()),
        soak_minutes=args.soak_minutes, concurrency=tuple(int(c) for c in args.concurrency.split(",")),
        duration_s=args.duration, warmup_s=args.warmup, step_duration_s=args.step_duration,
        start_rate=args.start_rate, step_rate=args.step_rate, max_steps=args.max_steps,
        ceiling_concurrency=args.ceiling_concurrency, processes=args.processes, soak_rate=args.soak_rate,
        sample_s=args.sample_every, out=Path(args.out) if args.out else None, quick=args.quick,
        env={**({"COPILOT_EMBEDDER": args.embedder} if args.embedder else {}),
             **dict(kv.split("=", 1) for kv in args.env)})

    if args.quick:
        opts = replace(opts, tenants=min(opts.tenants, 10), curve=tuple(c for c in opts.curve if c <= 20) or (5, 10),
                       soak_minutes=min(opts.soak_minutes, 0.5), concurrency=(1, 8), duration_s=3.0,
                       warmup_s=1.0, step_duration_s=3.0, max_steps=3, sample_s=2.0)
    if opts.tenants < 1 or any(c < 1 for c in opts.curve):
        parser.error("tenant counts must be positive")
    return opts


@dataclass
class Report:
    machine: dict[str, str]
    options: Options
    lines: list[str] = field(default_factory=list)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)
        for line in lines:
            print(line, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    opts = parse(argv)
    machine = machine_details()
    report = Report(machine, opts)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    log(f"machine: {json.dumps(machine)}")
    if ghz.find_ghz() is None:
        log(f"note: {ghz.absent_reason()}; the project's generator measures the ceiling instead, "
            "and the ghz run of bench/ghz/answer.json is skipped")
    counts = sorted({*opts.curve, opts.tenants})
    with tempfile.TemporaryDirectory(prefix="copilot-loadsuite-") as tmp:
        settings = settings_on_free_ports(Settings.from_env(), Path(tmp))
        mesh = Mesh(settings, extra_env={"COPILOT_ACCESS_LOG": "0", **opts.env})
        t0 = time.perf_counter()
        issuer = mesh.start()
        log(f"mesh serving in {time.perf_counter() - t0:.1f}s")
        try:
            run_suite(mesh, settings, issuer, opts, counts, report, log)
        finally:
            codes = mesh.stop()
            log(f"mesh stopped: {codes}")
    write_report(report)


def run_suite(mesh: Mesh, settings: Settings, issuer: Any, opts: Options, counts: list[int], report: Report,
              log: Callable[[str], None]) -> None:
    edge = mesh.edge_address
    pids = mesh_pids(mesh)
    idle = snapshot(pids)
    sections: dict[str, list[str]] = {}

    # 1. The bare ceiling H, and what the mesh's own servers and Envoy make of the same call.
    generator = "ghz" if ghz.find_ghz() else "the project's generator"
    log(f"bare gRPC ceiling (grpc.health.v1 Check, closed loop, {generator})")
    bare = bare_ceiling(settings.host, opts)
    h = bare.rps
    log(f"  {bare.label}: {h:,.0f}/s  p50 {bare.p50_ms:.2f}  p99 {bare.p99_ms:.2f} ms  errors {bare.errors}")
    ceiling = [bare]
    for label, target in (("Python grpc.aio server (edge companion), direct", settings.address("edge_services")),
                          ("the same through Envoy", edge),
                          ("generation server, direct (OTel + identity interceptors)",
                           settings.address("generation"))):
        row = health_ceiling(label, target, opts, bare=False)
        log(f"  {label}: {row.rps:,.0f}/s ({of_h(row.rps, h)} H)  p50 {row.p50_ms:.2f}  p99 {row.p99_ms:.2f} ms  "
            f"errors {row.errors}")
        ceiling.append(row)
    sections["ceiling"] = table(("target", "RPS", "× H", "p50 ms", "p99 ms", "errors"), [
        (r.label, f"{r.rps:,.0f}", of_h(r.rps, h), ms(r.p50_ms), ms(r.p99_ms), r.errors) for r in ceiling])

    # 2.-4. Tenants in steps; the main stages at opts.tenants, a curve row at every count.
    provisioned = 0
    curve_rows: list[list[object]] = []
    rss_rows: list[list[object]] = []
    main_sustained: Step | None = None
    main_calls: tuple[Call, ...] = ()
    for count in counts:
        new = tenant_ids(provisioned, count)
        log(f"provisioning {len(new)} tenants (to {count}) through the edge")
        prov = asyncio.run(provision(edge, issuer, new))
        provisioned = count
        wait_for_edge(edge, issuer, new)
        log(f"  {prov.tenants} tenants, {prov.passages} passages in {prov.seconds:.1f}s "
            f"(create {prov.create_s / max(1, prov.tenants) * 1000:.0f} ms, "
            f"ingest {prov.ingest_s / max(1, prov.tenants) * 1000:.0f} ms per tenant, "
            f"{PROVISION_CONCURRENCY} at a time)")
        # Background work that grows with tenants (config refreshes, limit tables, flushers).
        time.sleep(1)
        quiet_from = snapshot(pids)
        time.sleep(IDLE_S)
        idle_cpu = {n: (s.cpu_s - quiet_from[n].cpu_s) * 1000 / IDLE_S
                    for n, s in snapshot(pids).items() if n in quiet_from}
        log(f"  idle CPU with {count} tenants: {sum(idle_cpu.values()):.0f} ms/s "
            f"{ {n: round(v) for n, v in idle_cpu.items()} }")
        everyone = tenant_ids(0, count)
        answers = build_calls(issuer, everyone, (("Answer", 8),))
        if count == opts.tenants:
            main_calls = answers
            mix = build_calls(issuer, everyone, MIX)
            sections["closed"] = closed_loop_stage(edge, mix, answers, opts, pids, log, h)
        closed, cpu = closed_with_cpu(edge, answers, 8, opts, pids)
        log(f"  Answer closed loop c=8 over {count} tenants: {fmt_stats(closed.total)}")
        log(f"  Answer open loop over {count} tenants:")
        found = find_sustained(edge, answers, opts.start_rate, opts.step_rate, opts.step_duration_s,
                               opts.warmup_s, opts.max_steps, opts.processes, log, refine=count == opts.tenants)
        best = found.sustained
        if count == opts.tenants:
            main_sustained = best
            sections["open"] = open_loop_table(found, h)
        rss = snapshot(pids)
        curve_rows.append([
            f"{count:,}", f"{prov.seconds:.1f} s ({prov.tenants} new)",
            f"{prov.create_s / max(1, prov.tenants) * 1000:.0f} / {prov.ingest_s / max(1, prov.tenants) * 1000:.0f}",
            ms(closed.total.p50_ms), ms(closed.total.p99_ms), f"{closed.total.rps:.0f}",
            f"{best.rate:.0f} ({of_h(best.rate, h)} H)" if best else f"< {opts.start_rate:.0f}",
            f"{sum(cpu.values()):.1f}", f"{sum(idle_cpu.values()):.0f}", errors_cell(closed.total)])
        rss_rows.append([f"{count:,}", *(mib(rss[n].rss_kb) if n in rss else "–" for n in PROCESS_NAMES),
                         mib(sum(s.rss_kb for s in rss.values()))])
        if count == opts.tenants and opts.soak_minutes > 0:
            rate = opts.soak_rate or (0.7 * best.rate if best else opts.start_rate / 2)
            sections["soak"] = soak_stage(edge, build_calls(issuer, everyone, MIX), rate, opts, pids, log)
    sections["curve"] = table(
        ("tenants", "provisioning (wall)", "create / ingest ms per tenant", "Answer c=8 p50 ms", "p99 ms",
         "c=8 ok/s", "sustained Answer/s (p99 ≤ 150 ms; × H)", "CPU ms per Answer (all processes)",
         "idle CPU ms/s (no load)", "errors"),
        curve_rows)
    sections["rss"] = table(("tenants", *(f"{n} MiB" for n in PROCESS_NAMES), "total MiB"),
                            [["idle, no tenant", *(mib(idle[n].rss_kb) if n in idle else "–" for n in PROCESS_NAMES),
                              mib(sum(s.rss_kb for s in idle.values()))], *rss_rows])
    by_ghz: ghz.GhzResult | str | None = None
    if main_calls and ghz.find_ghz():
        tenant = tenant_ids(0, 1)[0]
        rate = int(main_sustained.rate) if main_sustained else int(opts.start_rate)
        log(f"ghz: bench/ghz/answer.json at {rate}/s for {opts.step_duration_s:g} s, one tenant")
        by_ghz = ghz_open_loop(edge, issuer.mint(tenant, "ghz", ["member"]), tenant_questions(tenant)[0], rate,
                               opts.step_duration_s)
        sections["ghz"] = ghz_section(by_ghz, rate, h)
        log("  " + sections["ghz"][-1])
    headline(report, opts, main_sustained, sections, h, generator)


def ghz_section(result: ghz.GhzResult | str, rate: int, h: float) -> list[str]:
    if isinstance(result, str):
        return [f"ghz failed: {result}"]
    return table(("offered Answer/s (ghz, one tenant)", "calls", "ok/s", "× H", "p50 ms", "p99 ms", "errors"), [
        (rate, f"{result.count:,}", f"{result.ok_rps:.1f}", of_h(result.ok_rps, h), ms(result.p50_ms),
         ms(result.p99_ms), ghz_errors_cell(result))])


def closed_loop_stage(edge: str, mix: tuple[Call, ...], answers: tuple[Call, ...], opts: Options,
                      pids: dict[str, int], log: Callable[[str], None], h: float) -> list[str]:
    rows: list[list[object]] = []
    for name, calls in (("mix", mix), ("Answer only", answers)):
        for c in opts.concurrency:
            r, cpu = closed_with_cpu(edge, calls, c, opts, pids)
            log(f"  closed loop {name} c={c}: {fmt_stats(r.total)}")
            rows.append([name, c, "**all**", f"{r.total.rps:.1f}", of_h(r.total.rps, h), ms(r.total.p50_ms),
                         ms(r.total.p99_ms), ms(r.total.max_ms), errors_cell(r.total), f"{sum(cpu.values()):.2f}"])
            if name == "mix":
                for label, s in sorted(r.by_label.items()):
                    rows.append(["", "", label, f"{s.rps:.1f}", of_h(s.rps, h), ms(s.p50_ms), ms(s.p99_ms),
                                 ms(s.max_ms), errors_cell(s), ""])
    return table(("load", "concurrency", "RPC", "ok/s", "× H", "p50 ms", "p99 ms", "max ms", "errors",
                  "CPU ms per call (all processes)"), rows)


def open_loop_table(found: Search, h: float) -> list[str]:
    rows = [[f"{s.rate:.0f}", f"{s.result.total.rps:.1f}", of_h(s.result.total.rps, h), ms(s.result.total.p50_ms),
             ms(s.result.total.p90_ms), ms(s.result.total.p99_ms), ms(s.result.total.max_ms),
             errors_cell(s.result.total), f"{s.result.max_send_lag_s * 1000:.1f}", "yes" if s.ok else "no"]
            for s in sorted(found.steps, key=lambda s: s.rate)]
    return table(("offered Answer/s", "ok/s", "× H", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors",
                  "generator lag max ms", "sustained"), rows)


def soak_stage(edge: str, calls: tuple[Call, ...], rate: float, opts: Options, pids: dict[str, int],
               log: Callable[[str], None]) -> list[str]:
    duration = opts.soak_minutes * 60
    log(f"soak: the mix at {rate:.0f}/s for {opts.soak_minutes:g} min, sampling every {opts.sample_s:g}s")
    with Sampler(pids, opts.sample_s) as sampler:
        result = run_mix(MixSpec(target=edge, calls=calls, rate=rate, duration_s=duration, warmup_s=opts.warmup_s),
                         opts.processes)
    log(f"  soak: {fmt_stats(result.total)}")
    rows = []
    samples = sampler.samples
    for name in PROCESS_NAMES:
        series = [(t, s[name]) for t, s in samples if name in s]
        if not series:
            continue
        # Start: once the warm-up is over (caches filled), so growth means growth under steady load.
        steady = [x for x in series if x[0] >= opts.warmup_s] or series
        rss = [s.rss_kb for _, s in steady]
        fds = [s.fds for _, s in steady]
        rows.append([name, mib(rss[0]), mib(rss[-1]), mib(max(rss)), f"{(rss[-1] - rss[0]) / 1024:+.1f}",
                     fds[0], fds[-1], max(fds), f"{fds[-1] - fds[0]:+d}"])
    # The trajectory: the sample nearest each whole minute (and the last one).
    marks = sorted({min(range(len(samples)), key=lambda i: abs(samples[i][0] - m * 60))
                    for m in range(int(samples[-1][0] // 60) + 1)} | {len(samples) - 1}) if samples else []
    trajectory = table(("elapsed", *(f"{n} RSS MiB / fds" for n in PROCESS_NAMES)), [
        [f"{samples[i][0] / 60:.1f} min", *(f"{mib(samples[i][1][n].rss_kb)} / {samples[i][1][n].fds}"
                                            if n in samples[i][1] else "–" for n in PROCESS_NAMES)]
        for i in marks])
    summary = [f"Offered {rate:.0f} calls/s of the mix for {opts.soak_minutes:g} min over {opts.tenants} tenants "
               f"({len(samples)} samples, every {opts.sample_s:g} s): {result.total.ok:,} ok, "
               f"{result.total.error_count} errors {result.total.errors or ''}; p50 {ms(result.total.p50_ms)} ms, "
               f"p99 {ms(result.total.p99_ms)} ms, max {ms(result.total.max_ms)} ms.", ""]
    return summary + table(("process", "RSS start MiB", "end MiB", "max MiB", "growth MiB", "fds start", "end",
                            "max", "growth"), rows) + ["", "Over time:", "", *trajectory]


def headline(report: Report, opts: Options, sustained: Step | None, sections: dict[str, list[str]], h: float,
             generator: str) -> None:
    m = report.machine
    busy = float(m["load_average_at_start"].split("/")[0]) > 0.5
    report.add(
        "# Load suite results", "",
        "Written by `make bench-load` (`python -m bench.loadsuite"
        + (" --quick" if opts.quick else "") + f" --tenants {opts.tenants} --soak-minutes {opts.soak_minutes:g}`); "
        "re-run it to refresh this page. Embedded profile (SQLite/chDB, in-process rate limiter), extractive "
        "provider, basic (BM25) retrieval per request, access logs off; every call goes through Envoy "
        "(JWT verification + the per-tenant rate-limit check) except the direct rows of the ceiling. "
        f"One load generator process{'es' if opts.processes > 1 else ''} ({opts.processes}) on the same machine. "
        f"Mesh environment beyond the defaults: COPILOT_ACCESS_LOG=0"
        + "".join(f", {k}={v}" for k, v in opts.env.items()) + ".",
        "", "## Machine", "",
        *table(("", ""), [(k.replace("_", " "), v) for k, v in m.items()]), "",
    )
    if busy:
        report.add("**The machine was not idle**: the load average at start (above) shows other work "
                   "(other sessions' tests and benchmarks) sharing the two cores, so every figure here is a "
                   "lower bound for a quiet machine and varies from run to run.", "")
    best = f"{sustained.rate:.0f} Answer/s" if sustained else f"below {opts.start_rate:.0f} Answer/s"
    hour = f" (≈ {sustained.rate * 3600:,.0f} an hour)" if sustained else ""
    report.add("## Headline", "",
               f"- Full Answer path sustained at p99 ≤ {P99_TARGET_MS:.0f} ms with zero errors, "
               f"{opts.tenants} tenants, open loop: **{best}**{hour}"
               + (f", {of_h(sustained.rate, h)} of the bare ceiling H" if sustained else "") + ".",
               f"- H, the bare ceiling: {h:,.0f} calls/s (grpc.health.v1 Check against a grpc.aio server with "
               f"nothing else, {generator}, concurrency {opts.ceiling_concurrency}); every \"× H\" below is a "
               "rate divided by it.", "")
    report.add("## Bare gRPC ceiling (same run)", "",
               f"grpc.health.v1 Check, closed loop, concurrency {opts.ceiling_concurrency}, "
               f"{opts.duration_s:g} s measured after {opts.warmup_s:g} s warm-up, driven by {generator}. "
               "The first row is H: a grpc.aio server with grpc.health.v1 only (bench/bare_health.py: no "
               "interceptors, no reflection), started by the suite in its own process.", "",
               *sections["ceiling"], "")
    if "closed" in sections:
        report.add(f"## Closed loop, {opts.tenants} tenants", "",
                   "Mix per 20 calls: " + ", ".join(f"{k} {v}" for k, v in MIX)
                   + f"; {opts.duration_s:g} s measured per level after {opts.warmup_s:g} s warm-up. CPU per call "
                   "sums the CPU time of Envoy, edge, generation, retrieval and metering over the level.", "",
                   *sections["closed"], "")
    if "open" in sections:
        report.add(f"## Open loop: Answer at fixed rates, {opts.tenants} tenants", "",
                   f"Constant arrival rate, {opts.step_duration_s:g} s measured per rate after {opts.warmup_s:g} s "
                   "warm-up; latency from each call's scheduled send time. Sustained = p99 ≤ 150 ms, no error, "
                   "≥ 97 % of the scheduled calls answered in the window.", "", *sections["open"], "")
    if "ghz" in sections:
        report.add("ghz at the sustained rate: `bench/ghz/answer.json` with one tenant's token (a single ghz run "
                   "sends one token, so one tenant), open loop, same duration:", "", *sections["ghz"], "")
    report.add("## Cost of tenants", "",
               "Tenants added in steps to the same mesh (each: CreateTenant on the enterprise plan, then its own "
               f"corpus of 8 passages ingested through the edge, {PROVISION_CONCURRENCY} tenants at a time); at each "
               "step Answer is spread over all tenants.", "", *sections["curve"], "",
               "Resident memory of each process after each step:", "", *sections["rss"], "")
    if "soak" in sections:
        report.add("## Soak", "", *sections["soak"], "")


def write_report(report: Report) -> None:
    load = os.getloadavg()
    report.add(f"Load average at the end: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min).")
    if report.options.out is None:
        return
    out = report.options.out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Hand-written analysis below the marker survives a re-run.
    kept = ""
    if out.exists() and NOTES_MARKER in (previous := out.read_text()):
        kept = "\n" + NOTES_MARKER + previous.split(NOTES_MARKER, 1)[1]
    out.write_text("\n".join(report.lines) + "\n" + kept)
    print(f"\nwritten to {report.options.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
