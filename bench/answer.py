"""`python -m bench.answer`: GenerationService.Answer through the edge (Envoy, JWT, rate
limit) with the extractive provider on a tenant of 1,000 passages, at several
concurrencies. Reports RPS, p50/p99, and where the time goes: retrieval, the answerer,
and everything else (the pipeline's own overhead: quota check, config, PII masking,
prompt, citations, usage record — and, end to end, Envoy and the network).

  python -m bench.answer [--concurrency 1,8,32] [--duration 8] [--mode basic]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from google.protobuf import field_mask_pb2

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
from servers.common.settings import Settings

MAX_CALLS_PER_WORKER = 200_000
MODES = {"basic": common_pb2.RETRIEVAL_MODE_BASIC, "hybrid": common_pb2.RETRIEVAL_MODE_HYBRID,
         "decomposed": common_pb2.RETRIEVAL_MODE_DECOMPOSED}

SUBJECTS = ["customer due diligence", "sanctions screening", "transaction monitoring", "record keeping",
            "data retention", "access control", "incident reporting", "vendor risk", "whistleblowing",
            "conflicts of interest", "gifts and hospitality", "market abuse", "privacy notices",
            "data subject requests", "encryption of personal data", "business continuity", "outsourcing",
            "complaints handling", "training and awareness", "politically exposed persons"]
ACTORS = ["the Compliance Officer", "the Head of Financial Crime", "the Data Protection Officer",
          "the Risk Committee", "line managers", "the Board", "Internal Audit", "the Security team"]
PERIODS = ["24 hours", "72 hours", "five business days", "30 days", "one year", "five years", "ten years"]
ACTIONS = ["review", "approve", "escalate", "document", "test", "report", "retain", "reassess"]


def corpus(n_docs: int = 100, sections: int = 10, *, owner: str = "") -> list[retrieval_pb2.Document]:
    """n_docs × sections short sections: one passage each (1,000 by default). An `owner` (a
    tenant id) seeds the text and names the policies, so every tenant's corpus differs."""
    rnd = random.Random(owner or 7)
    docs = []
    for d in range(n_docs):
        subject = rnd.choice(SUBJECTS) if owner else SUBJECTS[d % len(SUBJECTS)]
        name = f"{owner} policy {d + 1}" if owner else f"Policy {d + 1}"
        parts = [f"# {name}: {subject}"]
        for s in range(sections):
            actor, period, action = rnd.choice(ACTORS), rnd.choice(PERIODS), rnd.choice(ACTIONS)
            topic = rnd.choice(SUBJECTS)
            parts.append(
                f"## {s + 1}. {topic.capitalize()} duty {s + 1}\n\n"
                f"{actor.capitalize()} must {action} every {topic} case within {period}. "
                f"Evidence of each {action} is kept in the {subject} register for {rnd.choice(PERIODS)}. "
                f"Exceptions to this rule for {topic} need written approval from {rnd.choice(ACTORS)}.")
        docs.append(retrieval_pb2.Document(document_id=f"policy-{d + 1:03d}", title=name,
                                           content_type="text/markdown", text="\n\n".join(parts)))
    return docs


def questions() -> list[str]:
    rnd = random.Random(11)
    return [f"Who must {rnd.choice(ACTIONS)} {topic} cases and within what period?"
            for topic in SUBJECTS] + [f"How long is evidence of {topic} kept?" for topic in SUBJECTS]


@dataclass
class Sample:
    client_s: float
    pipeline_s: float
    retrieval_s: float
    provider_s: float


@dataclass
class Round:
    concurrency: int
    duration_s: float
    samples: list[Sample] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        def q(values: list[float], pct: int) -> float:
            return statistics.quantiles(values, n=100, method="inclusive")[pct - 1] * 1000 if len(values) > 1 else (
                values[0] * 1000 if values else float("nan"))

        client = [s.client_s for s in self.samples]
        work = [s.retrieval_s + s.provider_s for s in self.samples]
        inside = [s.pipeline_s - s.retrieval_s - s.provider_s for s in self.samples]
        outside = [s.client_s - s.retrieval_s - s.provider_s for s in self.samples]
        return {
            "concurrency": self.concurrency, "calls": len(self.samples), "errors": sum(self.errors.values()),
            "rps": round(len(self.samples) / self.duration_s, 1),
            "p50_ms": round(q(client, 50), 2), "p99_ms": round(q(client, 99), 2),
            "retrieval_plus_answerer_p50_ms": round(q(work, 50), 2),
            "pipeline_overhead_p50_ms": round(q(inside, 50), 2),
            "end_to_end_overhead_p50_ms": round(q(outside, 50), 2),
            "end_to_end_overhead_share_p50": round(statistics.median(
                [(s.client_s - s.retrieval_s - s.provider_s) / s.client_s for s in self.samples]), 3)
            if self.samples else float("nan"),
        }


async def drive(edge: str, token: str, concurrency: int, duration_s: float, warmup_s: float, mode: int) -> Round:
    pool = questions()
    result = Round(concurrency=concurrency, duration_s=duration_s)
    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(edge) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        start = time.perf_counter()
        measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s

        async def worker(offset: int) -> None:
            for i in range(MAX_CALLS_PER_WORKER):
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                request = generation_pb2.AnswerRequest(question=pool[(offset + i) % len(pool)], mode=mode)  # type: ignore[arg-type]
                try:
                    response = await stub.Answer(request, metadata=metadata, timeout=30)
                except grpc.aio.AioRpcError as exc:
                    if t0 >= measure_from:
                        result.errors[exc.code().name] = result.errors.get(exc.code().name, 0) + 1
                    continue
                t1 = time.perf_counter()
                if t0 >= measure_from and t1 <= stop_at:
                    d = response.details
                    result.samples.append(Sample(client_s=t1 - t0, pipeline_s=d.latency.ToNanoseconds() / 1e9,
                                                 retrieval_s=d.retrieval_latency.ToNanoseconds() / 1e9,
                                                 provider_s=d.provider_latency.ToNanoseconds() / 1e9))

        await asyncio.gather(*(worker(i * 7) for i in range(concurrency)))
    return result


def setup_tenant(mesh: Mesh, issuer: object, mode: str) -> tuple[str, int]:
    tenant = "bench-answers"
    operator = (("authorization", f"Bearer {issuer.mint('platform', 'bench', ['operator'])}"),)  # type: ignore[attr-defined]
    admin = (("authorization", f"Bearer {issuer.mint(tenant, 'bench', ['member', 'admin'])}"),)  # type: ignore[attr-defined]
    with grpc.insecure_channel(mesh.edge_address) as ch:
        tenants = tenant_pb2_grpc.TenantServiceStub(ch)
        created = tenants.CreateTenant(tenant_pb2.CreateTenantRequest(
            tenant_id=tenant, display_name="bench", plan=common_pb2.PLAN_ENTERPRISE),
            metadata=operator, timeout=10).tenant
        created.limits.requests_per_second = 1_000_000
        created.limits.requests_per_minute = 60_000_000
        created.limits.requests_per_hour = 1_000_000_000
        created.config.retrieval_mode = MODES[mode]
        tenants.UpdateTenant(tenant_pb2.UpdateTenantRequest(tenant=created, update_mask=field_mask_pb2.FieldMask(
            paths=["limits.requests_per_second", "limits.requests_per_minute", "limits.requests_per_hour",
                   "config.retrieval_mode"])), metadata=operator, timeout=10)
        retrieval = retrieval_pb2_grpc.RetrievalServiceStub(ch)
        chunks = 0
        docs = corpus()
        for start in range(0, len(docs), 25):
            response = retrieval.IngestDocuments(retrieval_pb2.IngestDocumentsRequest(documents=docs[start:start + 25]),
                                                 metadata=admin, timeout=300)
            chunks += sum(r.chunks for r in response.results)
    return tenant, chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per concurrency")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--mode", choices=sorted(MODES), default="basic")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory(prefix="copilot-bench-") as tmp:
        settings = replace(settings_on_free_ports(Settings.from_env(), Path(tmp)), tenant_cache_ttl_s=2.0)
        mesh = Mesh(settings, extra_env={"COPILOT_ACCESS_LOG": "0"})
        issuer = mesh.start()
        try:
            tenant, chunks = setup_tenant(mesh, issuer, args.mode)
            time.sleep(settings.tenant_cache_ttl_s * 2 + 1)  # the edge and generation pick up the new config
            token = issuer.mint(tenant, "bench-user", ["member"], ttl_s=3600)
            rounds = [asyncio.run(drive(mesh.edge_address, token, c, args.duration, args.warmup, MODES[args.mode]))
                      for c in levels]
        finally:
            mesh.stop()

    print(f"GenerationService/Answer through the edge, extractive provider, {args.mode} retrieval, "
          f"{chunks} passages, {args.duration:.0f}s per level, {platform.machine()} x{os.cpu_count()}")
    print(f"{'conc':>4} {'rps':>7} {'p50 ms':>8} {'p99 ms':>8} {'retr+ans p50':>13} {'pipeline ovh p50':>17} "
          f"{'e2e ovh p50':>12} {'e2e ovh share':>14} {'errors':>6}")
    summaries = [r.summary() for r in rounds]
    for s in summaries:
        print(f"{s['concurrency']:>4} {s['rps']:>7} {s['p50_ms']:>8} {s['p99_ms']:>8} "
              f"{s['retrieval_plus_answerer_p50_ms']:>13} {s['pipeline_overhead_p50_ms']:>17} "
              f"{s['end_to_end_overhead_p50_ms']:>12} {s['end_to_end_overhead_share_p50']:>14} {s['errors']:>6}")
    print(json.dumps({"passages": chunks, "mode": args.mode, "levels": summaries}))


if __name__ == "__main__":
    main()
