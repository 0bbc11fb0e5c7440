"""Crash safety of usage: kill -9 the metering server in the middle of a stream of events,
restart it, and ClickHouse holds exactly the acknowledged events; replaying every event
changes nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from copilot.v1 import metering_pb2, metering_pb2_grpc
from copilot_cli.supervisor import free_port
from servers.metering.storage import clickhouse
from servers.metering.storage.clickhouse import ChdbBackend

pytestmark = pytest.mark.integration

OPERATOR = (("x-tenant-id", "platform"), ("x-user-id", "ops"), ("x-roles", "operator"))
TENANT = "crashy"
WRITER = (("x-tenant-id", TENANT), ("x-user-id", "service:test"), ("x-roles", "service"))
MEMBER = (("x-tenant-id", TENANT), ("x-user-id", "alice"), ("x-roles", "member"))
BATCH = 50


@dataclass
class MeteringProcess:
    data_dir: Path
    env: dict[str, str]
    port: int
    proc: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        log_path = self.data_dir / f"metering-{len(self.logs)}.log"
        self.logs.append(log_path)
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "servers.metering"], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, log_path.read_text()[-2000:]
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(service="copilot.v1.MeteringService"),
                                  timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise AssertionError("metering did not start:\n" + log_path.read_text()[-2000:])

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def metering_env(data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "CLICKHOUSE_URL")}
    env.update({"COPILOT_DATA_DIR": str(data_dir), "COPILOT_METERING_PORT": str(port), "COPILOT_HOST": "127.0.0.1",
                "COPILOT_ACCESS_LOG": "0", "COPILOT_METRICS_PORT_BASE": "0", **extra})
    return env


def seed_tenant(data_dir: Path) -> None:
    """Writes the tenant into the metering server's tenant store before it starts: this
    server runs alone, with no retrieval service for onboarding to provision."""
    from datetime import UTC, datetime

    from servers.metering.tenants.domain import new_tenant
    from servers.metering.tenants.plans import Plan
    from servers.metering.tenants.store import SqliteTenantStore

    async def seed() -> None:
        store = SqliteTenantStore(data_dir / "metering" / "tenants.sqlite")
        await store.open()
        try:
            await store.create(new_tenant(TENANT, TENANT, Plan.ENTERPRISE, datetime.now(UTC)))
        finally:
            await store.close()

    asyncio.run(seed())


@pytest.fixture
def metering(tmp_path: Path) -> Iterator[MeteringProcess]:
    seed_tenant(tmp_path)
    port = free_port()
    server = MeteringProcess(tmp_path, metering_env(tmp_path, port), port)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def batch(n: int) -> metering_pb2.RecordUsageRequest:
    return metering_pb2.RecordUsageRequest(events=[
        metering_pb2.UsageEvent(event_id=f"b{n}-e{i}", kind=metering_pb2.USAGE_KIND_QUERY, model="m1",
                                requests=1, input_tokens=3, output_tokens=2) for i in range(BATCH)])


async def usage_events(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        usage = await metering_pb2_grpc.MeteringServiceStub(channel).GetUsage(
            metering_pb2.GetUsageRequest(), metadata=MEMBER, timeout=10)
        return int(usage.events)


async def stream_until_killed(server: MeteringProcess, kill_after: int, senders: int = 4,
                              max_batches: int = 2000, first: int = 0) -> tuple[set[int], set[int]]:
    """Sends batches from `senders` concurrent callers; kills the server (SIGKILL) once
    `kill_after` batches were acknowledged. Returns (acknowledged, not acknowledged)."""
    acked: set[int] = set()
    failed: set[int] = set()
    counter = iter(range(first, first + max_batches))
    killed = asyncio.Event()

    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = metering_pb2_grpc.MeteringServiceStub(channel)

        async def sender() -> None:
            for n in counter:
                if killed.is_set():
                    return
                try:
                    await stub.RecordUsage(batch(n), metadata=WRITER, timeout=10)
                    acked.add(n)
                except grpc.aio.AioRpcError:
                    failed.add(n)
                    return
                if len(acked) >= kill_after and not killed.is_set():
                    killed.set()
                    await asyncio.to_thread(server.kill9)

        await asyncio.wait_for(asyncio.gather(*(sender() for _ in range(senders))), timeout=120)
    assert killed.is_set(), "the stream ended before the kill"
    return acked, failed


async def test_kill9_mid_stream_loses_nothing_acknowledged_and_replays_change_nothing(
        metering: MeteringProcess) -> None:
    acked, failed = await stream_until_killed(metering, kill_after=40)
    metering.start()
    # Everything acknowledged is there; of the batches cut off by the kill, each is there
    # whole or not at all (a batch is one log record).
    count = await usage_events(metering.address)
    print(f"acknowledged {len(acked)} batches, cut off {len(failed)}, found {count // BATCH} after the restart")
    assert len(acked) * BATCH <= count <= (len(acked) + len(failed)) * BATCH
    assert count % BATCH == 0

    async with grpc.aio.insecure_channel(metering.address) as channel:
        stub = metering_pb2_grpc.MeteringServiceStub(channel)
        # The client retries what was not acknowledged: now every batch is.
        for n in sorted(failed):
            await stub.RecordUsage(batch(n), metadata=WRITER, timeout=10)
        total = (len(acked) + len(failed)) * BATCH
        assert await usage_events(metering.address) == total
        # Replaying every event again changes nothing.
        for n in sorted(acked | failed):
            replay = await stub.RecordUsage(batch(n), metadata=WRITER, timeout=10)
            assert (replay.recorded, replay.duplicates) == (0, BATCH)
    assert await usage_events(metering.address) == total

    # And ClickHouse itself (after a graceful stop flushed the log) holds each event once.
    metering.stop()
    db = ChdbBackend(metering.data_dir / "metering" / "chdb")
    await db.open()
    try:
        rows = await db.query(clickhouse.COUNT_SQL, {"tenant": TENANT})
        assert int(rows[0][0]) == total
    finally:
        await db.close()
