"""Two replicas of every service behind the real Envoy, sharing a redis-server the supervisor
started: answers are spread over both generation replicas; one killed with SIGKILL in the
middle of a loop of answers costs no call (Envoy retries on the other) and bills each answer
once; respawned, it serves again. The same for an edge companion replica, with rate limits
still exact through Redis, and for a retrieval replica (both read one set of tenant files); a
streamed answer cut by a kill fails (INTERNAL: a reset stream) and is billed at most once. The
active metering killed: the standby takes over, nothing is lost or billed twice, the audit
chain continues."""

from __future__ import annotations

import asyncio
import shutil
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import field_mask_pb2
from prometheus_client.parser import text_string_to_metric_families

from copilot.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    metering_pb2,
    metering_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
    tenant_pb2,
    tenant_pb2_grpc,
)
from copilot_cli.supervisor import replica_name
from tests.fakes.llm_server import FakeLLMServer
from tests.integration.conftest import RunningMesh, create_tenant, running_mesh
from tests.integration.test_admission import budget_one_answer

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")]

DOC = retrieval_pb2.Document(
    document_id="kyc-policy", title="KYC policy",
    text="High-risk customers are rescreened every six months. The compliance officer approves high-risk "
         "customers. Customer records are kept for five years after the relationship ends.")
QUESTION = "How often are high-risk customers rescreened?"
GENERATION = "copilot.v1.GenerationService"
# Bounded loops: count and wall time.
ANSWERS = 60
CONCURRENCY = 4
LOOP_S = 120.0
HOURLY_LIMIT = 20


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory, fake_llm: FakeLLMServer) -> Iterator[RunningMesh]:
    with running_mesh(tmp_path_factory, "replicamesh", {**fake_llm.provider_env(), "COPILOT_ACCESS_LOG": "1"},
                      replicas=2) as running:
        yield running


def _samples(mesh: RunningMesh, service: str, replica: int, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples called `name` on replica `replica` of `service` (its own /metrics)."""
    port = mesh.settings.metrics_port(service, replica)
    with urllib.request.urlopen(f"http://{mesh.settings.host}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return [(s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name]


def _answered(mesh: RunningMesh, replica: int) -> float:
    """Answers generation replica `replica` served OK."""
    return sum(value for labels, value in _samples(mesh, "generation", replica, "copilot_rpc_requests_total")
               if labels.get("service") == GENERATION and labels.get("method") == "Answer"
               and labels.get("code") == "OK")


def _checked(mesh: RunningMesh, replica: int) -> float:
    """Rate limit checks edge companion replica `replica` answered."""
    return sum(value for _, value in _samples(mesh, "edge", replica, "copilot_ratelimit_checks_total"))


async def _usage(mesh: RunningMesh, channel: grpc.aio.Channel, tenant: str) -> int:
    usage = await metering_pb2_grpc.MeteringServiceStub(channel).GetUsage(
        metering_pb2.GetUsageRequest(), metadata=mesh.auth(tenant), timeout=5)
    return int(usage.requests)


async def _settled_usage(mesh: RunningMesh, channel: grpc.aio.Channel, tenant: str, expected: int) -> int:
    """The tenant's billed requests once they reach `expected` (outboxes drain, the usage log
    flushes), or what they are after a bounded wait; then a moment more, so a late duplicate
    would show."""
    deadline = time.monotonic() + 60
    billed = await _usage(mesh, channel, tenant)
    while billed < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        billed = await _usage(mesh, channel, tenant)
    await asyncio.sleep(2)
    return await _usage(mesh, channel, tenant)


async def _answer_loop(mesh: RunningMesh, channel: grpc.aio.Channel, tenant: str, count: int,
                       during: asyncio.Event | None = None) -> tuple[int, list[grpc.StatusCode]]:
    """`count` unary Answers at CONCURRENCY (bounded by LOOP_S); sets `during` after a third of
    them. Returns (answers received, codes of the failed calls)."""
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)
    ok, failed = 0, []
    deadline = time.monotonic() + LOOP_S

    async def worker() -> None:
        nonlocal ok
        while not queue.empty() and time.monotonic() < deadline:
            i = queue.get_nowait()
            try:
                response = await stub.Answer(generation_pb2.AnswerRequest(question=f"{QUESTION} ({i})"),
                                             metadata=mesh.auth(tenant), timeout=30)
                assert response.answer
                ok += 1
            except grpc.aio.AioRpcError as exc:
                failed.append(exc.code())
            if during is not None and ok + len(failed) >= count // 3:
                during.set()

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return ok, failed


async def _search(mesh: RunningMesh, searches: retrieval_pb2_grpc.RetrievalServiceAsyncStub, tenant: str,
                  query: str) -> grpc.StatusCode:
    """One Search through the edge as a member of `tenant`: its status code."""
    try:
        await searches.Search(retrieval_pb2.SearchRequest(query=query), metadata=mesh.auth(tenant), timeout=10)
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        return exc.code()


async def _tenant(mesh: RunningMesh, channel: grpc.aio.Channel, prefix: str, provider: str = "") -> str:
    return await create_tenant(mesh, channel, plan=common_pb2.PLAN_ENTERPRISE, prefix=prefix, provider=provider,
                               documents=[DOC])


async def test_answers_are_served_by_every_generation_replica(replicated: RunningMesh) -> None:
    async with grpc.aio.insecure_channel(replicated.edge) as channel:
        tenant = await _tenant(replicated, channel, "spread")
        before = [_answered(replicated, i) for i in range(2)]
        ok, failed = await _answer_loop(replicated, channel, tenant, 20)
        after = [_answered(replicated, i) for i in range(2)]
        assert (ok, failed) == (20, [])
        served = [a - b for a, b in zip(after, before, strict=True)]
        assert sum(served) == 20 and all(n > 0 for n in served), served
        assert await _settled_usage(replicated, channel, tenant, 20) == 20


async def test_a_generation_replica_killed_mid_loop_costs_no_answer_and_bills_each_once(
        replicated: RunningMesh) -> None:
    victim = replica_name("generation", 1)
    async with grpc.aio.insecure_channel(replicated.edge) as channel:
        tenant = await _tenant(replicated, channel, "failover")
        halfway = asyncio.Event()
        loop = asyncio.create_task(_answer_loop(replicated, channel, tenant, ANSWERS, during=halfway))
        await asyncio.wait_for(halfway.wait(), LOOP_S)
        await asyncio.to_thread(replicated.mesh.kill, victim)
        ok, failed = await loop
        # Envoy's retries (on another replica) absorbed the loss.
        assert failed == [] and ok == ANSWERS
        # Back, and serving again once Envoy has it in the rotation (health checks, ejection time).
        await asyncio.to_thread(replicated.mesh.respawn, victim)
        deadline = time.monotonic() + 60
        extra = 0
        while _answered(replicated, 1) == 0:
            assert time.monotonic() < deadline, "the respawned replica never served an answer"
            more, more_failed = await _answer_loop(replicated, channel, tenant, 4)
            assert more_failed == []
            extra += more
        # Every answer received billed exactly once: none lost with the killed replica (its
        # outbox is replayed by the respawned one), none twice (a retried attempt has the
        # same edge request id, so the same usage event).
        assert await _settled_usage(replicated, channel, tenant, ANSWERS + extra) == ANSWERS + extra


async def test_a_stream_cut_by_a_kill_fails_and_is_billed_at_most_once(
        replicated: RunningMesh, fake_llm: FakeLLMServer) -> None:
    """Envoy retries a StreamAnswer only before its first message reached the client; after
    that, the client sees the loss. Four slow streams, one tenant each, are spread over both
    replicas; replica 1 dies while they stream."""
    victim = replica_name("generation", 1)
    async with grpc.aio.insecure_channel(replicated.edge) as channel:
        tenants = [await _tenant(replicated, channel, "cut", provider="openai") for _ in range(4)]
        await asyncio.sleep(replicated.settings.tenant_cache_ttl_s + 0.5)
        fake_llm.reset()
        fake_llm.state.chunk_delay_s = 0.3
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        started = asyncio.Semaphore(0)

        async def stream(tenant: str) -> tuple[int, grpc.StatusCode, str]:
            received = 0
            call = stub.StreamAnswer(generation_pb2.StreamAnswerRequest(question=QUESTION),
                                     metadata=replicated.auth(tenant), timeout=60)
            try:
                async for _ in call:
                    received += 1
                    if received == 1:
                        started.release()
                return received, grpc.StatusCode.OK, ""
            except grpc.aio.AioRpcError as exc:
                return received, exc.code(), exc.details() or ""

        try:
            tasks = [asyncio.create_task(stream(t)) for t in tenants]
            for _ in tenants:
                await asyncio.wait_for(started.acquire(), 30)
            await asyncio.to_thread(replicated.mesh.kill, victim)
            results = await asyncio.gather(*tasks)
        finally:
            fake_llm.state.chunk_delay_s = 0
        codes = [code for _, code, _ in results]
        # Round robin put some on each replica: those on the killed one were cut mid-way, after
        # their first message (so never retried). Envoy can only reset such a stream, and gRPC
        # maps a reset stream (RST_STREAM other than REFUSED_STREAM) to INTERNAL, not UNAVAILABLE
        # (docs/scale-out.md): the client sees the cut; it never sees a half answer as complete.
        cut = [(received, code, details) for received, code, details in results if code != grpc.StatusCode.OK]
        assert grpc.StatusCode.OK in codes and cut, results
        assert all(code == grpc.StatusCode.INTERNAL and "RST_STREAM" in details for _, code, details in cut), cut
        assert all(received >= 1 for received, _, _ in results)
        await asyncio.to_thread(replicated.mesh.respawn, victim)
        for tenant, (_, code, _) in zip(tenants, results, strict=True):
            billed = await _settled_usage(replicated, channel, tenant, 1 if code == grpc.StatusCode.OK else 0)
            assert billed == 1 if code == grpc.StatusCode.OK else billed <= 1, (tenant, code, billed)


async def test_an_edge_replica_killed_mid_loop_refuses_nothing_and_limits_stay_exact(
        replicated: RunningMesh) -> None:
    victim = replica_name("edge", 1)
    async with grpc.aio.insecure_channel(replicated.edge) as channel:
        tenant = await _tenant(replicated, channel, "edgefail")
        searches = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        before = [_checked(replicated, i) for i in range(2)]
        codes: list[grpc.StatusCode] = []
        deadline = time.monotonic() + LOOP_S
        for i in range(ANSWERS):
            if i == ANSWERS // 3:
                await asyncio.to_thread(replicated.mesh.kill, victim)
            if time.monotonic() > deadline:
                break
            codes.append(await _search(replicated, searches, tenant, "rescreened"))
        assert codes == [grpc.StatusCode.OK] * ANSWERS
        await asyncio.to_thread(replicated.mesh.respawn, victim)

        # Both replicas serving again: a tenant's hourly limit holds exactly across them (Redis).
        limited = await create_tenant(replicated, channel, plan=common_pb2.PLAN_FREE, prefix="edgelimit")
        await tenant_pb2_grpc.TenantServiceStub(channel).UpdateTenant(tenant_pb2.UpdateTenantRequest(
            tenant=tenant_pb2.Tenant(tenant_id=limited, limits=tenant_pb2.TenantLimits(
                requests_per_second=1000, requests_per_minute=1000, requests_per_hour=HOURLY_LIMIT)),
            update_mask=field_mask_pb2.FieldMask(paths=["limits.requests_per_second", "limits.requests_per_minute",
                                                        "limits.requests_per_hour"])),
            metadata=replicated.operator(), timeout=5)
        # Both companions load the new limits, and the calls fall in one hour window.
        await asyncio.sleep(replicated.settings.tenant_cache_ttl_s * 2 + 0.5)
        if 3600 - time.time() % 3600 < 15:
            await asyncio.sleep(16)
        # Until the respawned replica has answered rate limit checks again (bounded).
        deadline = time.monotonic() + 60
        while _checked(replicated, 1) == 0:
            assert time.monotonic() < deadline, "the respawned edge replica never served a rate limit check"
            await searches.Search(retrieval_pb2.SearchRequest(query="warm"), metadata=replicated.auth(tenant),
                                  timeout=10)
        first = [_checked(replicated, i) for i in range(2)]
        limit_codes: list[grpc.StatusCode] = []
        for _ in range(HOURLY_LIMIT + 10):
            limit_codes.append(await _search(replicated, searches, limited, "limits"))
        last = [_checked(replicated, i) for i in range(2)]
        assert limit_codes.count(grpc.StatusCode.OK) == HOURLY_LIMIT, limit_codes
        assert limit_codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 10, limit_codes
        # Both replicas took part in the checks: before the kill, and in the exact count after the respawn.
        assert all(n > 0 for n in before) and all(b > a for a, b in zip(first, last, strict=True)), \
            (before, first, last)


def _searched(mesh: RunningMesh, replica: int) -> float:
    """Searches retrieval replica `replica` served OK (from the edge and from generation)."""
    return sum(value for labels, value in _samples(mesh, "retrieval", replica, "copilot_rpc_requests_total")
               if labels.get("method") == "Search" and labels.get("code") == "OK")


async def test_a_retrieval_replica_killed_mid_loop_costs_no_call_and_writes_reach_every_replica(
        replicated: RunningMesh) -> None:
    """Both retrieval replicas read and write one set of tenant files: a document ingested
    while one is down is found by it once it is back, whichever replica a call reaches."""
    victim = replica_name("retrieval", 1)
    async with grpc.aio.insecure_channel(replicated.edge) as channel:
        tenants = [await _tenant(replicated, channel, "retrfail") for _ in range(3)]
        searches = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        # Generation's searches are balanced over both replicas; the edge's go to each
        # tenant's owner on the ring.
        before = [_searched(replicated, i) for i in range(2)]
        ok, failed = await _answer_loop(replicated, channel, tenants[0], 12)
        assert (ok, failed) == (12, [])
        assert all(_searched(replicated, i) > b for i, b in enumerate(before)), before
        halfway = asyncio.Event()
        loop = asyncio.create_task(_answer_loop(replicated, channel, tenants[1], ANSWERS // 2, during=halfway))
        codes: list[grpc.StatusCode] = []
        for i in range(ANSWERS // 2):
            if i == ANSWERS // 6:
                await asyncio.to_thread(replicated.mesh.kill, victim)
            codes.append(await _search(replicated, searches, tenants[i % len(tenants)], "rescreened"))
        ok, failed = await loop
        assert codes == [grpc.StatusCode.OK] * (ANSWERS // 2) and (ok, failed) == (ANSWERS // 2, [])
        # Written while the victim is down, read by every replica once it is back.
        new = retrieval_pb2.Document(document_id="sanctions", title="Sanctions",
                                     text="Sanctions screening runs against the consolidated list on every payment.")
        for tenant in tenants:
            await searches.IngestDocuments(retrieval_pb2.IngestDocumentsRequest(documents=[new]),
                                           metadata=replicated.auth(tenant, ("member", "admin")), timeout=60)
        await asyncio.to_thread(replicated.mesh.respawn, victim)
        deadline = time.monotonic() + 60
        while _searched(replicated, 1) == 0:
            assert time.monotonic() < deadline, "the respawned retrieval replica never served a search"
            _, more_failed = await _answer_loop(replicated, channel, tenants[2], 4)
            assert more_failed == []
        # Each replica, called directly (as a service behind the edge is), finds it.
        for replica in range(2):
            assert await _top_hits(replicated, replica, tenants, "consolidated list") == ["sanctions"] * 3
        # Caches warmed on one replica are not served after the other one writes.
        assert await _top_hits(replicated, 1, tenants, "whistleblowing hotline") != ["whistle"] * 3
        whistle = retrieval_pb2.Document(document_id="whistle", title="Whistleblowing",
                                         text="Staff report concerns through the whistleblowing hotline.")
        async with grpc.aio.insecure_channel(replicated.settings.address("retrieval", 0)) as direct:
            for tenant in tenants:
                await retrieval_pb2_grpc.RetrievalServiceStub(direct).IngestDocuments(
                    retrieval_pb2.IngestDocumentsRequest(documents=[whistle]),
                    metadata=_behind_the_edge(tenant, "admin"), timeout=60)
        assert await _top_hits(replicated, 1, tenants, "whistleblowing hotline") == ["whistle"] * 3


def _behind_the_edge(tenant: str, role: str = "member") -> tuple[tuple[str, str], ...]:
    """The identity headers Envoy sets on a verified call (services trust them behind the edge)."""
    return (("x-tenant-id", tenant), ("x-user-id", "replica-test"), ("x-roles", role))


async def _top_hits(mesh: RunningMesh, replica: int, tenants: list[str], query: str) -> list[str]:
    """Each tenant's best hit for `query` on one retrieval replica, called directly."""
    async with grpc.aio.insecure_channel(mesh.settings.address("retrieval", replica)) as direct:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(direct)
        tops = []
        for tenant in tenants:
            found = await stub.Search(retrieval_pb2.SearchRequest(query=query), metadata=_behind_the_edge(tenant),
                                      timeout=10)
            tops.append(found.hits[0].document_id if found.hits else "")
        return tops


async def test_the_active_metering_killed_mid_loop_a_standby_takes_over_and_nothing_is_lost(
        replicated: RunningMesh) -> None:
    """One metering replica is active (it holds the lock on metering's stores), the other
    stands by. Killed mid-loop, the standby takes over: answers and usage reads go on, each
    answer is billed once, and the tenant's audit chain continues unbroken."""
    mesh = replicated.mesh
    active = await asyncio.to_thread(mesh.active_metering)
    assert active is not None
    async with grpc.aio.insecure_channel(replicated.edge) as channel:
        tenant = await _tenant(replicated, channel, "meterfail")
        usage = metering_pb2_grpc.MeteringServiceStub(channel)
        halfway = asyncio.Event()
        loop = asyncio.create_task(_answer_loop(replicated, channel, tenant, ANSWERS, during=halfway))
        await asyncio.wait_for(halfway.wait(), LOOP_S)
        await asyncio.to_thread(mesh.kill, active)
        reads: list[grpc.StatusCode] = []
        while not loop.done():
            try:
                await usage.GetUsage(metering_pb2.GetUsageRequest(), metadata=replicated.auth(tenant), timeout=10)
                reads.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                reads.append(exc.code())
            await asyncio.sleep(0.1)
        ok, failed = await loop
        assert (ok, failed) == (ANSWERS, []) and set(reads) == {grpc.StatusCode.OK}, (ok, failed, reads)
        successor = await asyncio.to_thread(mesh.active_metering)
        assert successor is not None and successor != active
        # Back as a standby: the successor keeps the lock.
        await asyncio.to_thread(mesh.respawn, active)
        assert await asyncio.to_thread(mesh.active_metering) == successor
        assert await _settled_usage(replicated, channel, tenant, ANSWERS) == ANSWERS
        # One unbroken chain across the takeover: the tenant's creation, ingest and every question.
        verdict = await audit_pb2_grpc.AuditServiceStub(channel).VerifyAuditChain(
            audit_pb2.VerifyAuditChainRequest(tenant_id=tenant), metadata=replicated.operator(), timeout=30)
        assert verdict.ok and verdict.events_checked >= ANSWERS + 2, verdict


def _answer_calls(mesh: RunningMesh, replica: int) -> float:
    """Answers generation replica `replica` finished, whatever their status."""
    return sum(value for labels, value in _samples(mesh, "generation", replica, "copilot_rpc_requests_total")
               if labels.get("service") == GENERATION and labels.get("method") == "Answer")


async def test_a_burst_across_both_generation_replicas_admits_exactly_the_budget(replicated: RunningMesh) -> None:
    """Room for one answer at max_tokens, a burst of 40 spread over both generation replicas:
    exactly one is admitted (the reservations are atomic in the shared ledger), and billed once."""
    async with grpc.aio.insecure_channel(replicated.edge) as channel:
        tenant = await _tenant(replicated, channel, "burst")
        await budget_one_answer(replicated, channel, tenant, extra=1)
        answers = generation_pb2_grpc.GenerationServiceStub(channel)
        before = [_answer_calls(replicated, i) for i in range(2)]

        async def ask(i: int) -> grpc.StatusCode:
            try:
                await answers.Answer(generation_pb2.AnswerRequest(question=f"{QUESTION} ({i})"),
                                     metadata=replicated.auth(tenant), timeout=30)
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                return exc.code()

        codes = await asyncio.gather(*(ask(i) for i in range(40)))
        after = [_answer_calls(replicated, i) for i in range(2)]
        assert codes.count(grpc.StatusCode.OK) == 1, codes
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
        assert await _settled_usage(replicated, channel, tenant, 1) == 1
