"""The usage log on Redis Streams (REDIS_URL): a real redis-server started by the test,
stopped and restarted mid-run, and the metering server killed with SIGKILL mid-stream."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from copilot.v1 import metering_pb2_grpc
from copilot_cli.supervisor import free_port
from tests.integration.test_metering_crash import (
    BATCH,
    WRITER,
    MeteringProcess,
    batch,
    metering_env,
    seed_tenant,
    stream_until_killed,
    usage_events,
)

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")]


class RedisServer:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_timeout=1).ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def send(address: str, n: int) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            await metering_pb2_grpc.MeteringServiceStub(channel).RecordUsage(
                batch(n), metadata=WRITER, timeout=10)
            return True
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            return False


async def test_redis_restart_and_kill9_lose_nothing_and_count_nothing_twice(
        tmp_path: Path, redis_server: RedisServer) -> None:
    port = free_port()
    await asyncio.to_thread(seed_tenant, tmp_path)
    metering = MeteringProcess(tmp_path, metering_env(tmp_path, port, REDIS_URL=redis_server.url), port)
    metering.start()
    try:
        acked = {n for n in range(10) if await send(metering.address, n)}
        assert acked == set(range(10))

        # Redis goes away: nothing is acknowledged (and no id claimed) until it is back.
        await asyncio.to_thread(redis_server.stop)
        assert not await send(metering.address, 10)
        await asyncio.to_thread(redis_server.start)
        for n in range(10, 20):
            deadline = time.monotonic() + 20
            while not await send(metering.address, n):
                assert time.monotonic() < deadline, "metering did not recover from the Redis restart"
                await asyncio.sleep(0.2)
            acked.add(n)
        assert await usage_events(metering.address) == 20 * BATCH

        # The metering server dies mid-stream; what Redis holds is flushed on restart.
        more, failed = await stream_until_killed(metering, kill_after=15, senders=3, max_batches=500,
                                                 first=20)
        metering.start()
        count = await usage_events(metering.address)
        assert (20 + len(more)) * BATCH <= count <= (20 + len(more) + len(failed)) * BATCH
        for n in sorted(failed):
            assert await send(metering.address, n)
        total = (20 + len(more) + len(failed)) * BATCH
        assert await usage_events(metering.address) == total
        async with grpc.aio.insecure_channel(metering.address) as channel:
            stub = metering_pb2_grpc.MeteringServiceStub(channel)
            for n in sorted(acked | more | failed):
                replay = await stub.RecordUsage(batch(n), metadata=WRITER, timeout=10)
                assert (replay.recorded, replay.duplicates) == (0, BATCH)
        assert await usage_events(metering.address) == total
    finally:
        metering.stop()
    # Everything was flushed and acknowledged in the stream: nothing left pending there.
    client = redis.Redis(port=redis_server.port)
    assert client.xlen("copilot:usage:log") == 0
