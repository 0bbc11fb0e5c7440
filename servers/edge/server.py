"""The edge's companion server: what Envoy calls besides the four services.

- envoy.service.ratelimit.v3 RateLimitService: per-tenant limits (service.py);
- grpc.health.v1 for the whole mesh (health_proxy.py);
- server reflection for every public service, so grpcurl through the edge can list,
  describe and call all of them (the edge routes /grpc.reflection. here).

Envoy calls it, not a user: it needs no tenant identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from envoy.service.ratelimit.v3 import rls_pb2_grpc

# Imported for their descriptors: reflection answers from the default pool.
from copilot.v1 import audit_pb2, generation_pb2, metering_pb2, retrieval_pb2, tenant_pb2  # noqa: F401
from servers.common.lifecycle import Service
from servers.common.settings import Settings
from servers.edge.config import TenantLimits
from servers.edge.health_proxy import OWNERS, HealthProxy
from servers.edge.http import EdgeHttp
from servers.edge.limiter import InProcessLimiter, Limiter
from servers.edge.redis import RedisLimiter
from servers.edge.service import SERVICE_NAME, RateLimitServicer

log = logging.getLogger("copilot.edge")

PUBLIC_SERVICES = tuple(OWNERS)
PRUNE_EVERY_S = 60.0


def make_limiter(settings: Settings) -> Limiter:
    if settings.redis_url:
        return RedisLimiter.from_url(settings.redis_url)
    return InProcessLimiter()


def build(settings: Settings) -> Service:
    limits = TenantLimits.from_settings(settings)
    limiter = make_limiter(settings)
    ratelimit = RateLimitServicer(limits, limiter, fail_open=settings.ratelimit_fail_open)
    health = HealthProxy.from_settings(settings, local_names=(SERVICE_NAME,))
    http = EdgeHttp(keys_dir=settings.data_dir / "keys", jwt_issuer=settings.jwt_issuer,
                    jwt_audience=settings.jwt_audience, dev_tokens=settings.dev_tokens,
                    tenants=limits.active_tenants)
    tasks: list[asyncio.Task[None]] = []

    def register(server: grpc.aio.Server) -> None:
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(ratelimit, server)

    async def start() -> None:
        await limits.start()
        await http.start(settings.host, settings.port("edge_http"))
        tasks.append(asyncio.create_task(_prune(limiter), name="ratelimit-prune"))
        log.info("rate limiting", extra={
            "limiter": type(limiter).__name__, "fail_open": settings.ratelimit_fail_open,
            "tenants": len(limits)})

    async def stop() -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await http.stop()
        await limits.stop()
        await limiter.close()

    return Service(
        name="edge",
        port=settings.port("edge_services"),
        service_names=list(PUBLIC_SERVICES),
        register=register,
        on_start=[start],
        on_stop=[stop],
        identity_required=False,
        health=health,
        traced=False,
    )


async def _prune(limiter: Limiter) -> None:
    # State of tenants that went quiet would otherwise stay for the process's life.
    while True:
        await asyncio.sleep(PRUNE_EVERY_S)
        limiter.prune()
