"""Builds the metering server: MeteringService + TenantService over their stores."""

from __future__ import annotations

import grpc

from copilot.v1 import metering_pb2_grpc, tenant_pb2_grpc
from servers.common import lifecycle
from servers.common.settings import Settings
from servers.metering.service import MeteringServiceServicer, TenantServiceServicer
from servers.metering.tenants import CachedTenantStore, SqliteTenantStore, TenantStore
from servers.metering.usage import SqliteUsageStore, UsageStore

SERVICE_NAMES = ["copilot.v1.MeteringService", "copilot.v1.TenantService"]


def tenant_store(settings: Settings) -> TenantStore:
    return SqliteTenantStore(settings.service_dir("metering") / "tenants.sqlite")


def usage_store(settings: Settings) -> UsageStore:
    # Where a ClickHouse (CLICKHOUSE_URL) or chDB backend, fed through a durable log,
    # plugs in later: the servicers only know the UsageStore interface.
    return SqliteUsageStore(settings.service_dir("metering") / "usage.sqlite")


def build(settings: Settings) -> lifecycle.Service:
    tenants = CachedTenantStore(tenant_store(settings), settings.tenant_cache_ttl_s)
    usage = usage_store(settings)
    metering = MeteringServiceServicer(tenants, usage)
    tenant_service = TenantServiceServicer(tenants)

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
        on_start=[tenants.open, usage.open],
        on_stop=[usage.close, tenants.close],
    )
