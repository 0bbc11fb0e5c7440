"""Builds the metering server: MeteringService + TenantService over their stores."""

from __future__ import annotations

import grpc

from copilot.v1 import metering_pb2_grpc, tenant_pb2_grpc
from servers.common import lifecycle
from servers.common.settings import Settings
from servers.metering import clickhouse
from servers.metering.billing import billing_from
from servers.metering.chstore import ClickHouseUsageStore
from servers.metering.onboarding import Onboarding, RetrievalHook, TenantHook
from servers.metering.pricing import PriceTable
from servers.metering.service import MeteringServiceServicer, TenantServiceServicer
from servers.metering.tenants import CachedTenantStore, SqliteTenantStore, TenantStore
from servers.metering.usage import SqliteUsageStore, UsageStore
from servers.metering.usagelog import LocalLog, RedisStreamLog, UsageLog

SERVICE_NAMES = ["copilot.v1.MeteringService", "copilot.v1.TenantService"]


def tenant_store(settings: Settings) -> TenantStore:
    return SqliteTenantStore(settings.service_dir("metering") / "tenants.sqlite")


def usage_store(settings: Settings) -> UsageStore:
    """ClickHouse (a server at CLICKHOUSE_URL, else chDB in-process) fed through the durable
    local log; COPILOT_USAGE_BACKEND=sqlite keeps the skeleton's SQLite store."""
    directory = settings.service_dir("metering")
    if settings.usage_backend == "sqlite":
        return SqliteUsageStore(directory / "usage.sqlite")
    if settings.usage_backend != "clickhouse":
        raise SystemExit(f"COPILOT_USAGE_BACKEND must be clickhouse or sqlite, not {settings.usage_backend!r}")
    usage_log: UsageLog = RedisStreamLog(settings.redis_url) if settings.redis_url else LocalLog(
        directory / "usage-log")
    return ClickHouseUsageStore(clickhouse.backend(settings.clickhouse_url, directory / "chdb"),
                                usage_log,
                                flush_interval_s=settings.usage_flush_interval_s)


def build(settings: Settings) -> lifecycle.Service:
    tenants = CachedTenantStore(tenant_store(settings), settings.tenant_cache_ttl_s)
    usage = usage_store(settings)
    retrieval_channel = lifecycle.connect(settings.address("retrieval"))
    hooks: list[TenantHook] = [RetrievalHook(retrieval_channel)]
    billing = billing_from(settings, usage)
    if billing is not None:
        hooks.append(billing.customers)
    prices = PriceTable.load(settings.price_table)
    metering = MeteringServiceServicer(tenants, usage, prices=prices, billing=billing)
    tenant_service = TenantServiceServicer(tenants, onboarding=Onboarding(hooks), usage=usage,
                                           usage_on_delete=settings.usage_on_delete)

    async def close_channels() -> None:
        tenant_service.watchers.close()
        await retrieval_channel.close(None)
        if billing is not None:
            await billing.close()

    def register(server: grpc.aio.Server) -> None:
        metering_pb2_grpc.add_MeteringServiceServicer_to_server(metering, server)
        tenant_pb2_grpc.add_TenantServiceServicer_to_server(tenant_service, server)

    async def stores_answer() -> bool:
        return await tenants.ping() and await usage.ping()

    return lifecycle.Service(
        name="metering",
        port=settings.metering_port,
        service_names=list(SERVICE_NAMES),
        register=register,
        dependencies={"stores": stores_answer},
        on_start=[tenants.open, usage.open, *([billing.open] if billing is not None else [])],
        on_stop=[close_channels, usage.close, tenants.close],
    )
