"""`python -m bench.audit`: the answer path's latency with and without the audit trail, in one run.

Starts its own mesh and the bench.answer tenant (1,000 passages, extractive provider, basic
retrieval), then drives GenerationService.Answer through the edge in three phases — audit
on, audit off (generation restarted with COPILOT_AUDIT=0), audit on again — at each
concurrency, so drift of the shared machine shows as a difference between the two "on"
phases. After each "on" phase it checks that every answer left exactly one QUESTION event.

  python -m bench.audit [--concurrency 1,8] [--duration 6]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import grpc

from bench.answer import MODES, Round, drive, setup_tenant
from copilot.v1 import audit_pb2, audit_pb2_grpc
from copilot_cli.supervisor import Mesh, settings_on_free_ports
from servers.common.settings import Settings


async def question_events(edge: str, operator_token: str, tenant: str) -> int:
    """QUESTION events in the tenant's trail once the outbox has delivered them all."""
    metadata = (("authorization", f"Bearer {operator_token}"),)
    async with grpc.aio.insecure_channel(edge) as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        count = 0
        async for batch in stub.ExportAuditEvents(audit_pb2.ExportAuditEventsRequest(
                tenant_id=tenant, filter=audit_pb2.AuditFilter(kinds=[audit_pb2.AUDIT_EVENT_KIND_QUESTION])),
                metadata=metadata, timeout=300):
            count += len(batch.events)
        return count


def settled_questions(edge: str, operator_token: str, tenant: str, outbox: Path) -> int:
    for _ in range(600):  # at most 60 s for the outbox to drain
        if not list(outbox.glob("*.json")):
            break
        time.sleep(0.1)
    return asyncio.run(question_events(edge, operator_token, tenant))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds per phase and level")
    parser.add_argument("--warmup", type=float, default=1.5)
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    mode = MODES["basic"]
    results: list[tuple[str, Round]] = []
    checks: list[dict[str, int]] = []

    with tempfile.TemporaryDirectory(prefix="copilot-bench-audit-") as tmp:
        settings = replace(settings_on_free_ports(Settings.from_env(), Path(tmp)), tenant_cache_ttl_s=2.0)
        mesh = Mesh(settings, extra_env={"COPILOT_ACCESS_LOG": "0", "COPILOT_AUDIT": "1"})
        issuer = mesh.start()
        try:
            tenant, chunks = setup_tenant(mesh, issuer, "basic")
            time.sleep(settings.tenant_cache_ttl_s * 2 + 1)
            token = issuer.mint(tenant, "bench-user", ["member"], ttl_s=3600)
            operator = issuer.mint("platform", "bench", ["operator"], ttl_s=3600)
            outbox = settings.data_dir / "generation" / "audit-outbox"
            audited_before = 0
            for phase, audit in (("audit on", "1"), ("audit off", "0"), ("audit on (again)", "1")):
                if mesh.extra_env["COPILOT_AUDIT"] != audit:
                    mesh.extra_env["COPILOT_AUDIT"] = audit
                    mesh.restart("generation")
                    time.sleep(1.0)
                answered = 0
                for c in levels:
                    r = asyncio.run(drive(mesh.edge_address, token, c, args.duration, args.warmup, mode))
                    results.append((phase, r))
                    answered += len(r.samples)
                if audit == "1":
                    audited = settled_questions(mesh.edge_address, operator, tenant, outbox)
                    # Warm-up and cut-off calls are answered (and audited) but not sampled.
                    checks.append({"phase_samples": answered, "question_events_added": audited - audited_before})
                    audited_before = audited
        finally:
            mesh.stop()

    print(f"GenerationService/Answer through the edge, extractive provider, basic retrieval, {chunks} passages, "
          f"{args.duration:.0f}s per phase and level, {platform.machine()} x{os.cpu_count()}")
    print(f"{'phase':18} {'conc':>4} {'rps':>7} {'p50 ms':>8} {'p99 ms':>8} {'pipeline ovh p50':>17} {'errors':>6}")
    summaries = []
    for phase, r in results:
        s = r.summary()
        summaries.append({"phase": phase, **s})
        print(f"{phase:18} {s['concurrency']:>4} {s['rps']:>7} {s['p50_ms']:>8} {s['p99_ms']:>8} "
              f"{s['pipeline_overhead_p50_ms']:>17} {s['errors']:>6}")
    for check in checks:
        print(f"audited phase: {check['phase_samples']} sampled answers, {check['question_events_added']} QUESTION "
              "events (≥ samples: warm-up answers are audited too)")
    print(json.dumps({"passages": chunks, "levels": summaries, "audit_checks": checks}))


if __name__ == "__main__":
    main()
