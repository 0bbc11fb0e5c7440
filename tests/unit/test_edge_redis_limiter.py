"""The Redis limiter against a real redis-server on a free loopback port (skipped without one)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from copilot.v1 import tenant_pb2
from servers.edge.config import TenantLimits, limits_of
from servers.edge.limiter import SECOND, LimiterError
from servers.edge.redis import RedisLimiter
from servers.edge.service import RateLimitServicer

REDIS_SERVER = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def redis_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    assert REDIS_SERVER is not None
    port = unused_port()
    workdir: Path = tmp_path_factory.mktemp("redis")
    proc = await asyncio.create_subprocess_exec(
        REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(workdir), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    probe = RedisLimiter.from_url(url)
    try:
        for _ in range(100):
            if await probe.ping():
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("redis-server did not start")
        yield url
    finally:
        await probe.close()
        proc.terminate()
        await proc.wait()


@pytest_asyncio.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """The test's own connection, to look at what the limiters stored."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest_asyncio.fixture
async def limiters(redis_url: str) -> AsyncIterator[tuple[RedisLimiter, RedisLimiter]]:
    # Two limiters on separate connection pools: two edge instances sharing one Redis.
    prefix = f"test:{time.monotonic_ns()}"
    a, b = RedisLimiter.from_url(redis_url, prefix=prefix), RedisLimiter.from_url(redis_url, prefix=prefix)
    yield a, b
    await a.close()
    await b.close()


async def wait_for_fresh_window(seconds: int, margin: float = 0.3) -> None:
    """Keeps a test's hits inside one window of `seconds`."""
    if seconds - time.time() % seconds < margin:
        await asyncio.sleep(seconds - time.time() % seconds + 0.01)


async def test_limits_are_shared_across_instances(limiters: tuple[RedisLimiter, RedisLimiter]) -> None:
    a, b = limiters
    limits = limits_of(0, 4, 0)
    await wait_for_fresh_window(60, margin=2)
    decisions = [await (a if i % 2 else b).hit("acme", limits) for i in range(6)]
    assert [d.over_limit for d in decisions] == [False] * 4 + [True] * 2
    assert [d.remaining for d in decisions[:4]] == [3, 2, 1, 0]
    assert decisions[4].reset_s <= 60
    assert not (await a.hit("globex", limits)).over_limit  # tenants are independent


async def test_refused_hits_are_taken_back_and_windows_reset(limiters: tuple[RedisLimiter, RedisLimiter]) -> None:
    a, _ = limiters
    limits = limits_of(2, 0, 5)
    await wait_for_fresh_window(1)
    assert [(await a.hit("acme", limits)).over_limit for _ in range(10)] == [False, False] + [True] * 8
    await asyncio.sleep(1 - time.time() % 1 + 0.01)
    second = [await a.hit("acme", limits) for _ in range(3)]
    # The hour counted only the 4 admitted hits.
    assert [d.over_limit for d in second] == [False, False, True]
    assert second[1].remaining == 0
    over = second[2]
    assert over.window is not None and over.window.unit == SECOND


async def test_concurrent_hits_admit_exactly_the_limit(limiters: tuple[RedisLimiter, RedisLimiter]) -> None:
    a, b = limiters
    limits = limits_of(0, 0, 25)
    results = await asyncio.gather(*((a if i % 2 else b).hit("acme", limits) for i in range(60)))
    assert sum(not d.over_limit for d in results) == 25


async def test_window_keys_expire_with_their_window(redis_url: str, redis_client: aioredis.Redis) -> None:
    prefix = f"ttl:{time.monotonic_ns()}"
    limiter = RedisLimiter.from_url(redis_url, prefix=prefix)
    try:
        await limiter.hit("acme", limits_of(3, 0, 10))
        keys = sorted([k.decode() async for k in redis_client.scan_iter(match=f"{prefix}:*")])
        assert len(keys) == 2
        ttls = {k.split(":")[-2]: await redis_client.ttl(k) for k in keys}
        assert 0 < ttls["1"] <= 2 and 3500 < ttls["3600"] <= 3601
    finally:
        await limiter.close()


async def test_unreachable_redis_is_a_limiter_error_and_the_failure_mode_decides() -> None:
    limiter = RedisLimiter.from_url(f"redis://127.0.0.1:{unused_port()}/0")
    try:
        with pytest.raises(LimiterError):
            await limiter.hit("acme", limits_of(5, 0, 0))

        async def source() -> list[tenant_pb2.Tenant]:
            return []

        table = TenantLimits(source, refresh_s=60)
        request = rls_pb2.RateLimitRequest(domain="copilot", descriptors=[ratelimit_pb2.RateLimitDescriptor(
            entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="tenant_id", value="acme")])])
        for fail_open in (True, False):
            server = grpc.aio.server()
            rls_pb2_grpc.add_RateLimitServiceServicer_to_server(
                RateLimitServicer(table, limiter, fail_open=fail_open), server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = rls_pb2_grpc.RateLimitServiceStub(channel)
                started = time.monotonic()
                if fail_open:
                    response = await stub.ShouldRateLimit(request, timeout=5)
                    assert response.overall_code == rls_pb2.RateLimitResponse.OK
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await stub.ShouldRateLimit(request, timeout=5)
                    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                # Well inside Envoy's rate limit timeout.
                assert time.monotonic() - started < 0.2
            await server.stop(None)
    finally:
        await limiter.close()


async def _incrby_calls(client: aioredis.Redis) -> int:
    """INCRBY calls the Redis server has served (all clients: the test runs one limiter at a time)."""
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_incrby", {}).get("calls", 0))


async def test_a_full_window_is_refused_locally_until_it_ends(limiters: tuple[RedisLimiter, RedisLimiter],
                                                              redis_client: aioredis.Redis) -> None:
    a, b = limiters
    limits = limits_of(0, 3, 0)
    await wait_for_fresh_window(60, margin=2)
    for _ in range(3):
        assert not (await a.hit("acme", limits)).over_limit
    before = await _incrby_calls(redis_client)
    refused = [await a.hit("acme", limits) for _ in range(50)]
    assert all(d.over_limit for d in refused)
    assert refused[-1].window is not None and refused[-1].window.limit == 3
    assert await _incrby_calls(redis_client) == before  # the flood never reached Redis
    # The other instance learns it from Redis once, then refuses locally too.
    assert (await b.hit("acme", limits)).over_limit
    assert [(await b.hit("acme", limits)).over_limit for _ in range(5)] == [True] * 5
    assert await _incrby_calls(redis_client) == before + 1
    # A plan change takes effect at once, full window or not.
    assert not (await a.hit("acme", limits_of(0, 10, 0))).over_limit
