"""`python -m bench.failover`: an open-loop load of Answers, Searches and GetUsage over many
tenants through the edge of a mesh with 2 replicas of every service, while one replica of each
is killed with SIGKILL in turn and started again.

Per phase (steady; retrieval-1, generation-1, the active metering and edge-1 each killed and
restarted; steady again): successful calls per second, errors by gRPC code, p50/p99 (from each
call's scheduled send time, so a stall cannot hide), and how long until the killed replica
served again (from the kill to its first call served; for metering, to the standby's takeover:
the restarted one stands by). Afterwards: the usage billed against the answers received (exact:
each answer billed once, retried or not), every tenant's audit chain verified (no break, no
fork), and the quota ledger's counters against the usage store.

  python -m bench.failover [--tenants 20] [--rate 30] [--phase 20] [--replicas 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.load import Call, MixResult, MixSpec, open_loop, result_of
from copilot.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    common_pb2,
    generation_pb2,
    metering_pb2,
    metering_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
    tenant_pb2,
    tenant_pb2_grpc,
)
from copilot_cli.supervisor import Mesh, replica_name, settings_on_free_ports
from servers.common.issuer import DevIssuer
from servers.common.settings import Settings

QUESTIONS = ("How often are high-risk customers rescreened?", "Who approves a high-risk customer?",
             "How long are customer records kept?")
DOCUMENT = ("High-risk customers are rescreened every six months. The compliance officer approves high-risk "
            "customers. Customer records are kept for five years after the relationship ends. Sanctions "
            "screening runs on every payment.")
# Share of each RPC in the mix (per 20 calls).
MIX = (("Answer", 10), ("Search", 7), ("GetUsage", 3))
# How long to wait for the killed replica's first served call, and for usage to settle.
SERVE_AGAIN_MAX_S = 90.0
SETTLE_MAX_S = 60.0


@dataclass
class Phase:
    name: str
    result: MixResult
    killed: str | None = None
    serving_again_s: float | None = None  # from the kill to its first call served


def _metric(settings: Settings, service: str, replica: int) -> float:
    """Calls served by one replica: Answers for generation, Searches for retrieval, rate limit
    checks for the edge."""
    port = settings.metrics_port(service, replica)
    with urllib.request.urlopen(f"http://{settings.host}:{port}/metrics", timeout=2) as response:
        text = response.read().decode()

    def counts(name: str, labels: dict[str, str]) -> bool:
        if service == "edge":
            return name == "copilot_ratelimit_checks_total"
        method = "Search" if service == "retrieval" else "Answer"
        return name == "copilot_rpc_requests_total" and labels.get("method") == method and labels.get("code") == "OK"

    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if counts(s.name, s.labels))


def setup_tenants(mesh: Mesh, issuer: DevIssuer, count: int) -> list[str]:
    operator = (("authorization", f"Bearer {issuer.mint('platform', 'ops', ['operator'], ttl_s=3600)}"),)
    tenants = []
    with grpc.insecure_channel(mesh.edge_address) as channel:
        stub = tenant_pb2_grpc.TenantServiceStub(channel)
        retrieval = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        run = os.urandom(3).hex()
        for i in range(count):
            tenant = f"failover-{run}-{i:03d}"
            stub.CreateTenant(tenant_pb2.CreateTenantRequest(tenant_id=tenant, display_name=tenant,
                                                             plan=common_pb2.PLAN_ENTERPRISE),
                              metadata=operator, timeout=30)
            admin = (("authorization", f"Bearer {issuer.mint(tenant, 'bench-admin', ['member', 'admin'])}"),)
            retrieval.IngestDocuments(retrieval_pb2.IngestDocumentsRequest(documents=[retrieval_pb2.Document(
                document_id="kyc", title="KYC policy", text=DOCUMENT)]), metadata=admin, timeout=60)
            tenants.append(tenant)
    return tenants


def calls(issuer: DevIssuer, tenants: list[str]) -> tuple[Call, ...]:
    out = []
    for t, tenant in enumerate(tenants):
        metadata = (("authorization", f"Bearer {issuer.mint(tenant, 'bench-user', ['member'], ttl_s=7200)}"),)
        for label, share in MIX:
            for k in range(share):
                if label == "Answer":
                    method = "/copilot.v1.GenerationService/Answer"
                    question = QUESTIONS[(t + k) % len(QUESTIONS)]
                    body = generation_pb2.AnswerRequest(question=question).SerializeToString()
                elif label == "Search":
                    method = "/copilot.v1.RetrievalService/Search"
                    body = retrieval_pb2.SearchRequest(query="high-risk customers").SerializeToString()
                else:
                    method = "/copilot.v1.MeteringService/GetUsage"
                    body = metering_pb2.GetUsageRequest().SerializeToString()
                out.append(Call(label=label, method=method, request=body, metadata=metadata))
    # Tenants and RPCs interleaved rather than one tenant's calls back to back (same order every run).
    random.Random(7).shuffle(out)
    return tuple(out)


def run_phase(mesh: Mesh, spec: MixSpec, name: str, victim: str | None) -> Phase:
    """One phase of the open loop; with a victim, it is killed a second in and started again
    at once, and the time until it serves a call again is measured alongside."""
    served_again: list[float] = []
    done = threading.Event()

    def kill_and_respawn() -> None:
        assert victim is not None
        service, _, index = victim.partition("-")
        time.sleep(1.0)
        killed_at = time.monotonic()
        mesh.kill(victim)
        if service == "metering":
            # Serving again = a standby took over (the restarted one then stands by).
            while time.monotonic() - killed_at < SERVE_AGAIN_MAX_S and mesh.active_metering() is None:
                time.sleep(0.05)
            if mesh.active_metering() is not None:
                served_again.append(time.monotonic() - killed_at)
            mesh.respawn(victim, timeout_s=SERVE_AGAIN_MAX_S)
            return
        mesh.respawn(victim, timeout_s=SERVE_AGAIN_MAX_S)
        # Its counters start at 0 again: the first call it serves moves them.
        while time.monotonic() - killed_at < SERVE_AGAIN_MAX_S and not done.is_set():
            try:
                if _metric(mesh.settings, service, int(index or 0)) > 0:
                    served_again.append(time.monotonic() - killed_at)
                    return
            except OSError:
                pass
            time.sleep(0.1)

    worker = threading.Thread(target=kill_and_respawn, daemon=True) if victim else None
    if worker is not None:
        worker.start()
    outcome = asyncio.run(open_loop(spec, spec.rate, 0.0, 0))
    if worker is not None:
        worker.join(timeout=SERVE_AGAIN_MAX_S)
        done.set()
    return Phase(name, result_of(spec, outcome), victim, served_again[0] if served_again else None)


def billed(mesh: Mesh, issuer: DevIssuer, tenants: list[str]) -> int:
    with grpc.insecure_channel(mesh.edge_address) as channel:
        stub = metering_pb2_grpc.MeteringServiceStub(channel)
        return sum(int(stub.GetUsage(metering_pb2.GetUsageRequest(), timeout=10, metadata=(
            ("authorization", f"Bearer {issuer.mint(tenant, 'bench-check', ['member'])}"),)).requests)
            for tenant in tenants)


def settled_billing(mesh: Mesh, issuer: DevIssuer, tenants: list[str], answered: int) -> int:
    """Usage billed once the outboxes have drained and the usage log has flushed (bounded)."""
    deadline = time.monotonic() + SETTLE_MAX_S
    total = billed(mesh, issuer, tenants)
    while total < answered and time.monotonic() < deadline:
        time.sleep(1)
        total = billed(mesh, issuer, tenants)
    time.sleep(3)  # a late duplicate would show now
    return billed(mesh, issuer, tenants)


def audit_verdicts(mesh: Mesh, issuer: DevIssuer, tenants: list[str]) -> dict[str, str]:
    """Each tenant's audit chain verified by metering: "ok", or the first break."""
    operator = (("authorization", f"Bearer {issuer.mint('platform', 'ops', ['operator'], ttl_s=3600)}"),)
    out = {}
    with grpc.insecure_channel(mesh.edge_address) as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        for tenant in tenants:
            reply = stub.VerifyAuditChain(audit_pb2.VerifyAuditChainRequest(tenant_id=tenant), metadata=operator,
                                          timeout=60)
            out[tenant] = "ok" if reply.ok else audit_pb2.AuditChainProblem.Name(reply.first_break.problem)
    return out


def ledger_vs_store(mesh: Mesh, issuer: DevIssuer, tenants: list[str]) -> list[str]:
    """Tenants whose quota ledger (CheckQuota's tokens used this month) differs from the usage
    store's month total (GetUsage)."""
    differ = []
    with grpc.insecure_channel(mesh.edge_address) as channel:
        stub = metering_pb2_grpc.MeteringServiceStub(channel)
        for tenant in tenants:
            md = (("authorization", f"Bearer {issuer.mint(tenant, 'bench-check', ['member'])}"),)
            quota = stub.CheckQuota(metering_pb2.CheckQuotaRequest(), metadata=md, timeout=10)
            ledger = next(q.used for q in quota.quotas if q.name == "tokens_per_month")
            stored = stub.GetUsage(metering_pb2.GetUsageRequest(), metadata=md, timeout=10).total_tokens
            if ledger != stored:
                differ.append(f"{tenant}: ledger {ledger}, store {stored}")
    return differ


def _row(phase: Phase) -> str:
    total = phase.result.total
    errors = ", ".join(f"{code} {n}" for code, n in sorted(total.errors.items())) or "none"
    again = f"{phase.serving_again_s:.1f}" if phase.serving_again_s is not None else ("-" if not phase.killed
                                                                                       else "never")
    per_rpc = " ".join(f"{label} {s.rps:.1f}/s p99 {s.p99_ms:.0f}" for label, s in phase.result.by_label.items())
    return (f"| {phase.name} | {total.rps:.1f} | {errors} | {total.p50_ms:.0f} | {total.p99_ms:.0f} | {again} | "
            f"{per_rpc} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--rate", type=float, default=30.0, help="calls per second offered (open loop)")
    parser.add_argument("--phase", type=float, default=20.0, help="seconds per phase")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=10.0, help="deadline of each call (s)")
    args = parser.parse_args()
    if args.replicas < 2:
        parser.error("--replicas must be at least 2 (one of them is killed)")

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="copilot-bench-") as tmp:
        settings = settings_on_free_ports(replace(Settings.from_env(), replicas=args.replicas, tenant_cache_ttl_s=2.0),
                                          Path(tmp))
        mesh = Mesh(settings, extra_env={"COPILOT_ACCESS_LOG": "0"})
        issuer = mesh.start(timeout_s=120)
        try:
            tenants = setup_tenants(mesh, issuer, args.tenants)
            time.sleep(settings.tenant_cache_ttl_s * 2 + 1)  # the edges and generation know the tenants
            mix = calls(issuer, tenants)
            spec = MixSpec(target=mesh.edge_address, calls=mix, duration_s=args.phase, warmup_s=0.0, rate=args.rate,
                           timeout_s=args.timeout)
            phases = [run_phase(mesh, spec, "steady", None),
                      run_phase(mesh, spec, "retrieval-1 killed, restarted", replica_name("retrieval", 1)),
                      run_phase(mesh, spec, "generation-1 killed, restarted", replica_name("generation", 1))]
            active = mesh.active_metering()
            assert active is not None, "no metering replica serves"
            phases += [run_phase(mesh, spec, f"active metering ({active}) killed, restarted", active),
                       run_phase(mesh, spec, "edge-1 killed, restarted", replica_name("edge", 1)),
                       run_phase(mesh, spec, "steady again", None)]
            answered = sum(p.result.by_label["Answer"].ok for p in phases if "Answer" in p.result.by_label)
            failed_answers = sum(p.result.by_label["Answer"].error_count for p in phases
                                 if "Answer" in p.result.by_label)
            usage = settled_billing(mesh, issuer, tenants, answered)
            chains = audit_verdicts(mesh, issuer, tenants)
            ledger_differs = ledger_vs_store(mesh, issuer, tenants)
        finally:
            mesh.stop()
    load_after = os.getloadavg()

    print(f"Failover through the edge: {args.replicas} replicas of every service (one metering active), "
          f"{args.tenants} tenants, open loop {args.rate:g} calls/s (Answer/Search/GetUsage "
          f"{'/'.join(str(s * 5) for _, s in MIX)} %), {args.phase:g} s per phase; {platform.machine()} "
          f"x{os.cpu_count()}, load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print("| phase | ok/s | errors by code | p50 ms | p99 ms | killed replica serving again after (s) | per RPC |")
    print("|---|---|---|---|---|---|---|")
    for phase in phases:
        print(_row(phase))
    verdict = "exact" if usage == answered else ("MORE billed than answered" if usage > answered else "LESS billed")
    print(f"usage requests billed {usage} vs answers received {answered} ({verdict}); "
          f"answers failed {failed_answers}")
    broken = {t: v for t, v in chains.items() if v != "ok"}
    print(f"audit chains verified: {len(chains) - len(broken)} of {len(chains)} ok"
          + (f"; broken: {broken}" if broken else ""))
    print(f"quota ledger vs usage store (tokens this month): {len(tenants) - len(ledger_differs)} of "
          f"{len(tenants)} equal" + (f"; differ: {ledger_differs}" if ledger_differs else ""))
    print(json.dumps({"phases": [{"name": p.name, "ok_per_s": round(p.result.total.rps, 2),
                                  "errors": p.result.total.errors, "p99_ms": round(p.result.total.p99_ms, 1),
                                  "serving_again_s": p.serving_again_s} for p in phases],
                      "billed": usage, "answered": answered, "answers_failed": failed_answers,
                      "audit_chains_broken": broken, "ledger_differs": ledger_differs}))


if __name__ == "__main__":
    main()
