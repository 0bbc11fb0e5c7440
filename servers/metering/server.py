"""Builds the metering server: MeteringService + TenantService over their stores."""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import Any

import grpc

from copilot.v1 import audit_pb2_grpc, metering_pb2_grpc, tenant_pb2_grpc
from servers.common import lifecycle
from servers.common.leadership import Leadership
from servers.common.settings import Settings
from servers.metering.audit.service import AuditServiceServicer, MeteringAudit
from servers.metering.audit.store import AUDIT_CODEC, AuditStore
from servers.metering.billing.stripe import billing_from
from servers.metering.storage import clickhouse
from servers.metering.storage.log import LocalLog, RedisStreamLog, UsageLog
from servers.metering.tenants.onboarding import Onboarding, RetrievalHook, TenantHook
from servers.metering.tenants.service import TenantServiceServicer
from servers.metering.tenants.store import CachedTenantStore, SqliteTenantStore, TenantStore
from servers.metering.usage.clickhouse_store import ClickHouseUsageStore
from servers.metering.usage.ledger import LocalLedger, QuotaLedger
from servers.metering.usage.pricing import PriceTable
from servers.metering.usage.redis_ledger import RedisLedger
from servers.metering.usage.service import MeteringServiceServicer
from servers.metering.usage.store import SqliteUsageStore, UsageStore

SERVICE_NAMES = ["copilot.v1.MeteringService", "copilot.v1.TenantService", "copilot.v1.AuditService"]
# The leadership lock, in the data directory every replica shares (docs/metering-replicas.md).
LEADERSHIP_LOCK = "active.lock"
# How long the new active waits for chDB's directory lock: the dead active's locks all go in
# the same exit, but the election's may be dropped a moment before chDB's.
CHDB_LOCK_WAIT_S = 5.0
# Audit events are moved to ClickHouse once a second (each insert is a part, fsync'd, on the
# one ClickHouse thread usage shares); reads flush first, so they never miss an event.
AUDIT_FLUSH_INTERVAL_S = 1.0


def tenant_store(settings: Settings) -> TenantStore:
    return SqliteTenantStore(settings.service_dir("metering") / "tenants.sqlite")


def usage_store(settings: Settings) -> UsageStore:
    """ClickHouse (a server at CLICKHOUSE_URL, else chDB in-process) fed through the durable
    local log; COPILOT_USAGE_BACKEND=sqlite keeps the skeleton's SQLite store."""
    directory = settings.service_dir("metering")
    if settings.usage_backend == "sqlite":
        return SqliteUsageStore(directory / "usage.sqlite")
    usage_log: UsageLog = redis_log(settings.redis_url, settings) if settings.redis_url else LocalLog(
        directory / "usage-log")
    return ClickHouseUsageStore(clickhouse.backend(settings.clickhouse_url, directory / "chdb", CHDB_LOCK_WAIT_S),
                                usage_log,
                                flush_interval_s=settings.usage_flush_interval_s)


def audit_store(settings: Settings, usage: UsageStore) -> AuditStore:
    """The audit trail in the same ClickHouse as usage (chDB allows one data directory per
    process, so the backend is shared), behind its own durable log of the same kind."""
    directory = settings.service_dir("metering")
    audit_log: UsageLog = redis_log(settings.redis_url, settings, stream="copilot:audit:log", group="audit",
                                    codec=AUDIT_CODEC) if settings.redis_url else LocalLog(
        directory / "audit-log", codec=AUDIT_CODEC)
    if isinstance(usage, ClickHouseUsageStore):
        return AuditStore(usage.db, audit_log, flush_interval_s=AUDIT_FLUSH_INTERVAL_S)
    return AuditStore(clickhouse.backend(settings.clickhouse_url, directory / "chdb", CHDB_LOCK_WAIT_S), audit_log,
                      owns_db=True, flush_interval_s=AUDIT_FLUSH_INTERVAL_S)


def redis_log(url: str, settings: Settings, **options: Any) -> RedisStreamLog:
    """A log on a Redis stream, read as this replica's consumer. The logs are opened only by the
    active replica, holding the leadership lock: no other consumer flushes, so what a dead
    active had read and not committed is taken over at once, not after an idle time."""
    return RedisStreamLog(url, consumer=f"metering-{socket.gethostname()}-{settings.replica}", claim_idle_ms=0,
                          **options)


def quota_ledger(settings: Settings, usage: UsageStore) -> QuotaLedger:
    """Reservations in Redis when REDIS_URL is set (shared by every metering replica), else
    in this process (docs/admission.md)."""
    if settings.redis_url:
        return RedisLedger.from_url(settings.redis_url, usage,
                                    max_ttl=timedelta(seconds=settings.quota_reservation_max_ttl_s))
    return LocalLedger(usage)


def build(settings: Settings) -> lifecycle.Service:
    # One active replica per data directory: it alone opens the stores below (docs/metering-replicas.md).
    leadership = Leadership(settings.service_dir("metering") / LEADERSHIP_LOCK, settings.leadership_poll_s)
    tenants = CachedTenantStore(tenant_store(settings), settings.tenant_cache_ttl_s)
    usage = usage_store(settings)
    audit = MeteringAudit(audit_store(settings, usage), tenants)
    retrieval_channel = lifecycle.connect_peer(settings, "retrieval")
    hooks: list[TenantHook] = [RetrievalHook(retrieval_channel)]
    billing = billing_from(settings, usage)
    if billing is not None:
        hooks.append(billing.customers)
    prices = PriceTable.load(settings.price_table)
    # Not among health's dependencies: with Redis down, reservations answer UNAVAILABLE by
    # themselves (as RecordUsage does) while usage queries and tenants keep serving.
    ledger = quota_ledger(settings, usage)
    metering = MeteringServiceServicer(
        tenants, usage, prices=prices, billing=billing, ledger=ledger,
        reservation_ttl=timedelta(seconds=settings.quota_reservation_ttl_s),
        max_reservation_ttl=timedelta(seconds=settings.quota_reservation_max_ttl_s))
    tenant_service = TenantServiceServicer(tenants, onboarding=Onboarding(hooks), usage=usage,
                                           usage_on_delete=settings.usage_on_delete, audit=audit,
                                           audit_on_delete=settings.audit_on_tenant_delete)

    async def close_channels() -> None:
        tenant_service.watchers.close()
        await retrieval_channel.close(None)
        await ledger.close()
        if billing is not None:
            await billing.close()

    def register(server: grpc.aio.Server) -> None:
        metering_pb2_grpc.add_MeteringServiceServicer_to_server(metering, server)
        tenant_pb2_grpc.add_TenantServiceServicer_to_server(tenant_service, server)
        audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditServiceServicer(audit), server)

    async def stores_answer() -> bool:
        return await tenants.ping() and await usage.ping() and await audit.store.ping()

    async def close_audit() -> None:
        await audit.settled()
        await audit.store.close()

    return lifecycle.Service(
        name="metering",
        port=settings.port("metering"),
        service_names=list(SERVICE_NAMES),
        register=register,
        dependencies={"stores": stores_answer},
        on_start=[tenants.open, usage.open, audit.store.open, *([billing.open] if billing is not None else [])],
        # Run in reverse: the audit store closes before usage closes the ClickHouse they share;
        # the leadership goes last, once nothing of the state is open.
        on_stop=[leadership.release, close_channels, usage.close, close_audit, tenants.close],
        on_refusal=audit.refused,
        leadership=leadership.acquire,
    )
