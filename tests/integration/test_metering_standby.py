"""Metering replicas as active/standby (docs/metering-replicas.md), with real processes: two
metering servers on ONE data directory and one real redis-server (loopback, free ports), a
real retrieval process for tenant onboarding. The second is a standby (health NOT_SERVING,
every RPC refused UNAVAILABLE/STANDBY); the active records tenants, usage and audit events and
is killed with SIGKILL; the standby takes over within seconds and serves everything recorded
before the kill exactly once, with the audit chain continued, not forked."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from copilot.v1 import audit_pb2, audit_pb2_grpc, metering_pb2, metering_pb2_grpc, tenant_pb2, tenant_pb2_grpc
from copilot_cli.supervisor import free_port_block
from servers.common.errors import from_rpc_error
from servers.metering.server import SERVICE_NAMES
from servers.metering.storage.log import RedisStreamLog
from servers.metering.usage.domain import UsageEvent, UsageKind
from tests.integration.test_metering_crash import MeteringProcess, metering_env
from tests.integration.test_metering_redis import RedisServer

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")]

OPERATOR = (("x-tenant-id", "platform"), ("x-user-id", "ops"), ("x-roles", "operator"))
TENANTS = ("standby-a", "standby-b")
TENANT = TENANTS[0]
WRITER = (("x-tenant-id", TENANT), ("x-user-id", "service:test"), ("x-roles", "service"))
MEMBER = (("x-tenant-id", TENANT), ("x-user-id", "alice"), ("x-roles", "member"))
BATCH = 20
BATCHES_EARLY, BATCHES_LATE = 5, 5
# Left pending in the usage stream by a consumer that died after reading them.
ORPHANS = 7
AUDIT_FLUSHED, AUDIT_UNFLUSHED, AUDIT_AFTER = 4, 3, 5
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class Replica(MeteringProcess):
    """A metering process that may start as a standby: `launch` returns once it answers health."""

    def launch(self) -> None:
        log_path = self.data_dir / f"metering-{self.port}-{len(self.logs)}.log"
        self.logs.append(log_path)
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "servers.metering"], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, log_path.read_text()[-2000:]
            if self.health("") is not None:
                return
            time.sleep(0.1)
        raise AssertionError("metering did not listen:\n" + log_path.read_text()[-2000:])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def health(self, service: str) -> int | None:
        with grpc.insecure_channel(self.address) as channel:
            try:
                return int(health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=1).status)
            except grpc.RpcError:
                return None

    def log_text(self) -> str:
        return self.logs[-1].read_text()

    def wait_for_log(self, text: str, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.log_text():
            assert time.monotonic() < deadline, f"{text!r} not logged:\n{self.log_text()[-2000:]}"
            time.sleep(0.05)


class Retrieval:
    """The real retrieval service (hash embedder), for tenant onboarding."""

    def __init__(self, data_dir: Path, port: int, env: dict[str, str]) -> None:
        self.port = port
        self.log_path = data_dir / "retrieval.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "servers.retrieval"], env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.log_path.read_text()[-2000:]
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise AssertionError("retrieval did not start:\n" + self.log_path.read_text()[-2000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def batch(n: int) -> metering_pb2.RecordUsageRequest:
    return metering_pb2.RecordUsageRequest(events=[
        metering_pb2.UsageEvent(event_id=f"b{n}-e{i}", kind=metering_pb2.USAGE_KIND_QUERY, model="m1",
                                requests=1, input_tokens=3, output_tokens=2) for i in range(BATCH)])


def audit_events(prefix: str, n: int, redelivery: bool = False) -> audit_pb2.RecordAuditEventsRequest:
    return audit_pb2.RecordAuditEventsRequest(redelivery=redelivery, events=[audit_pb2.AuditEvent(
        event_id=f"{prefix}-{i}", kind=audit_pb2.AUDIT_EVENT_KIND_QUESTION, actor="alice", actor_roles=["member"],
        service="generation", question=audit_pb2.QuestionAudit(question=f"question {prefix} {i}"))
        for i in range(n)])


async def leave_orphans(redis_url: str) -> None:
    """Usage a metering consumer read from the stream and died before flushing: it sits in that
    consumer's pending list, for the next active to take over."""
    writer = RedisStreamLog(redis_url, consumer="metering-gone-3")
    await writer.open()
    await writer.append([UsageEvent(tenant_id=TENANT, event_id=f"orphan-{i}", kind=UsageKind.QUERY, model="m1",
                                    requests=1, input_tokens=3, output_tokens=2, occur_time=datetime.now(UTC))
                         for i in range(ORPHANS)], datetime.now(UTC))
    await writer.close()
    reader = RedisStreamLog(redis_url, consumer="metering-gone-3")
    assert len(await reader.open()) == 1
    await reader.close()  # dies: never commits


def refusal(exc: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str]:
    code, _, details = from_rpc_error(exc)
    reasons = [d.reason for d in details if isinstance(d, error_details_pb2.ErrorInfo)]
    return code, reasons[0] if reasons else ""


async def test_the_standby_refuses_then_takes_over_a_killed_active_with_nothing_lost_or_forked(
        tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    # Replica i listens on replica 0's port + i x the stride (Settings.port): three ports in a row.
    block = free_port_block(6)
    ports = [block, block + 1, block + 2]
    retrieval_port = block + 3  # replicas 1 and 2 of retrieval (never started) would take the next two
    env = {"REDIS_URL": redis_server.url, "COPILOT_REPLICAS": "3", "COPILOT_RETRIEVAL_PORT": str(retrieval_port),
           "COPILOT_REPLICA_PORT_STRIDE": "1"}
    retrieval = Retrieval(tmp_path, retrieval_port, metering_env(tmp_path, ports[0], **env, COPILOT_EMBEDDER="hash"))
    # Usage flushed rarely by the first active: all it acknowledged is still only in the stream
    # when it is killed.
    replicas = [Replica(tmp_path, metering_env(tmp_path, ports[0], **env, COPILOT_REPLICA=str(i),
                                               COPILOT_USAGE_FLUSH_INTERVAL_S="30" if i == 0 else "0.2"), port)
                for i, port in enumerate(ports)]
    active, standby, third = replicas
    try:
        await leave_orphans(redis_server.url)
        await asyncio.to_thread(active.start)  # SERVING
        await asyncio.to_thread(standby.launch)
        await asyncio.to_thread(standby.wait_for_log, f"standby: waiting for the lock held by pid {active.pid}")
        # Health says NOT_SERVING for the server and every service it hosts.
        for name in ("", *SERVICE_NAMES):
            assert standby.health(name) == NOT_SERVING, name
            assert active.health(name) == SERVING, name

        async with grpc.aio.insecure_channel(standby.address) as channel:
            calls: list[Any] = [
                metering_pb2_grpc.MeteringServiceStub(channel).GetUsage(
                    metering_pb2.GetUsageRequest(), metadata=MEMBER, timeout=10),
                metering_pb2_grpc.MeteringServiceStub(channel).RecordUsage(batch(999), metadata=WRITER, timeout=10),
                tenant_pb2_grpc.TenantServiceStub(channel).CreateTenant(
                    tenant_pb2.CreateTenantRequest(tenant_id="never"), metadata=OPERATOR, timeout=10),
                audit_pb2_grpc.AuditServiceStub(channel).RecordAuditEvents(
                    audit_events("never", 1), metadata=WRITER, timeout=10),
            ]
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call
                assert refusal(refused.value) == (grpc.StatusCode.UNAVAILABLE, "STANDBY")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in tenant_pb2_grpc.TenantServiceStub(channel).WatchTenants(
                        tenant_pb2.WatchTenantsRequest(), metadata=OPERATOR, timeout=10):
                    pass
            assert refusal(refused.value) == (grpc.StatusCode.UNAVAILABLE, "STANDBY")

        async with grpc.aio.insecure_channel(active.address) as channel:
            tenants = tenant_pb2_grpc.TenantServiceStub(channel)
            usage = metering_pb2_grpc.MeteringServiceStub(channel)
            audit = audit_pb2_grpc.AuditServiceStub(channel)
            for tenant_id in TENANTS:
                await tenants.CreateTenant(tenant_pb2.CreateTenantRequest(
                    tenant_id=tenant_id, display_name=tenant_id), metadata=OPERATOR, timeout=30)
            for n in range(BATCHES_EARLY):
                await usage.RecordUsage(batch(n), metadata=WRITER, timeout=10)
            await audit.RecordAuditEvents(audit_events("before", AUDIT_FLUSHED), metadata=WRITER, timeout=10)
            # Usage reads add the unflushed events (none is flushed yet: the interval is 30 s); audit
            # reads flush first, so the chain's head so far is in ClickHouse.
            assert (await usage.GetUsage(metering_pb2.GetUsageRequest(), metadata=MEMBER,
                                         timeout=10)).events == ORPHANS + BATCHES_EARLY * BATCH
            before = await audit.VerifyAuditChain(audit_pb2.VerifyAuditChainRequest(tenant_id=TENANT),
                                                  metadata=OPERATOR, timeout=10)
            assert before.ok and before.last_seq >= AUDIT_FLUSHED
            # Acknowledged, then the active dies before flushing them.
            for n in range(BATCHES_EARLY, BATCHES_EARLY + BATCHES_LATE):
                await usage.RecordUsage(batch(n), metadata=WRITER, timeout=10)
            await audit.RecordAuditEvents(audit_events("unflushed", AUDIT_UNFLUSHED), metadata=WRITER, timeout=10)
        killed = time.monotonic()
        await asyncio.to_thread(active.kill9)

        deadline = time.monotonic() + 30
        while standby.health("copilot.v1.MeteringService") != SERVING:
            assert time.monotonic() < deadline, "the standby did not take over:\n" + standby.log_text()[-3000:]
            await asyncio.sleep(0.05)
        print(f"the standby served {time.monotonic() - killed:.2f} s after the kill")
        assert "active: took over" in standby.log_text()
        assert all(standby.health(name) == SERVING for name in ("", *SERVICE_NAMES))

        async with grpc.aio.insecure_channel(standby.address) as channel:
            tenants = tenant_pb2_grpc.TenantServiceStub(channel)
            usage = metering_pb2_grpc.MeteringServiceStub(channel)
            audit = audit_pb2_grpc.AuditServiceStub(channel)
            listed = await tenants.ListTenants(tenant_pb2.ListTenantsRequest(), metadata=OPERATOR, timeout=10)
            assert set(TENANTS) <= {t.tenant_id for t in listed.tenants}
            # Every event acknowledged before the kill, once; the orphans too.
            total = ORPHANS + (BATCHES_EARLY + BATCHES_LATE) * BATCH
            assert (await usage.GetUsage(metering_pb2.GetUsageRequest(), metadata=MEMBER, timeout=10)).events == total
            replay = await usage.RecordUsage(batch(BATCHES_EARLY), metadata=WRITER, timeout=10)
            assert (replay.recorded, replay.duplicates) == (0, BATCH)

            # The chain holds everything recorded before the kill, then continues from its head.
            after_kill = await audit.VerifyAuditChain(audit_pb2.VerifyAuditChainRequest(
                tenant_id=TENANT, expected_head=audit_pb2.AuditChainHead(seq=before.last_seq,
                                                                         hash=before.head_hash)),
                metadata=OPERATOR, timeout=10)
            assert after_kill.ok, after_kill.first_break
            assert after_kill.last_seq == before.last_seq + AUDIT_UNFLUSHED
            # The client retries what the dead active acknowledged: nothing is chained twice.
            again = await audit.RecordAuditEvents(audit_events("unflushed", AUDIT_UNFLUSHED, redelivery=True),
                                                  metadata=WRITER, timeout=10)
            assert (again.recorded, again.duplicates) == (0, AUDIT_UNFLUSHED)
            await audit.RecordAuditEvents(audit_events("after", AUDIT_AFTER), metadata=WRITER, timeout=10)
            extended = await audit.VerifyAuditChain(audit_pb2.VerifyAuditChainRequest(
                tenant_id=TENANT, expected_head=audit_pb2.AuditChainHead(seq=after_kill.last_seq,
                                                                         hash=after_kill.head_hash)),
                metadata=OPERATOR, timeout=10)
            assert extended.ok, extended.first_break
            assert extended.last_seq == after_kill.last_seq + AUDIT_AFTER
            assert extended.events_checked == extended.last_seq

        # A standby told to stop just stops, and leaves the lock alone.
        await asyncio.to_thread(third.launch)
        await asyncio.to_thread(third.wait_for_log, f"standby: waiting for the lock held by pid {standby.pid}")
        os.kill(third.pid, signal.SIGTERM)
        assert third.proc is not None and await asyncio.to_thread(third.proc.wait, 30) == 0
        assert standby.health("") == SERVING

        # Stopped in order, the new active leaves nothing unflushed or unacknowledged in the
        # streams: what it took over (the orphans included) was flushed once, and committed.
        await asyncio.to_thread(standby.stop)
        client = redis.Redis(port=redis_server.port)
        for stream, group in (("copilot:usage:log", "flushers"), ("copilot:audit:log", "audit")):
            assert client.xpending(stream, group)["pending"] == 0
            assert client.xlen(stream) == 0
    finally:
        for replica in replicas:
            await asyncio.to_thread(replica.stop)
        retrieval.stop()
        redis_server.stop()
