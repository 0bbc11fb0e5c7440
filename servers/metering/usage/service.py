"""MeteringService over grpc.aio: usage, quotas, billing reports.

The caller's tenant always comes from the verified identity (`identity.current()`); a
request names another tenant only where an operator may act for it (`tenants.service.target_tenant`).
Domain errors raised here become rich gRPC statuses in the server interceptor.
"""

from __future__ import annotations

import functools
import logging
from datetime import timedelta
from typing import TYPE_CHECKING

from grpc.aio import ServicerContext

from copilot.v1 import metering_pb2, metering_pb2_grpc
from servers.common import identity, metrics, telemetry
from servers.common.errors import FieldViolation, InvalidArgument, NotFound, PermissionDenied, Unavailable
from servers.metering import convert
from servers.metering.tenants.domain import Tenant
from servers.metering.tenants.service import Clock, target_tenant, utcnow
from servers.metering.tenants.store import TenantStore
from servers.metering.usage.domain import MAX_BATCH, Window, month_start, validate_batch
from servers.metering.usage.ledger import QuotaLedger
from servers.metering.usage.pricing import PriceTable
from servers.metering.usage.quota import QuotaChecker
from servers.metering.usage.store import UsageStore

if TYPE_CHECKING:
    from servers.metering.billing.stripe import Billing

log = logging.getLogger("copilot.metering")


def _ensure_active(tenant: Tenant) -> Tenant:
    if tenant.suspended:
        raise PermissionDenied(f"tenant {tenant.tenant_id} is suspended", reason="TENANT_SUSPENDED",
                               metadata={"tenant_id": tenant.tenant_id})
    return tenant


class MeteringServiceServicer(metering_pb2_grpc.MeteringServiceServicer):
    def __init__(self, tenants: TenantStore, usage: UsageStore, clock: Clock = utcnow,
                 prices: PriceTable | None = None, billing: Billing | None = None,
                 ledger: QuotaLedger | None = None, reservation_ttl: timedelta = timedelta(seconds=120),
                 max_reservation_ttl: timedelta = timedelta(seconds=900)) -> None:
        self._tenants = tenants
        self._usage = usage
        self._clock = clock
        self._quota = QuotaChecker(usage, clock, ledger=ledger, reservation_ttl=reservation_ttl,
                                   max_reservation_ttl=max_reservation_ttl)
        self._prices = prices
        self._billing = billing
        # The durable log's backlog (events acknowledged, not yet in ClickHouse), read at
        # scrape time; a store without a log (SQLite) has none.
        if hasattr(usage, "pending_events"):
            metrics.SOURCES.gauge(*metrics.USAGE_LOG_DEPTH, lambda: float(getattr(usage, "pending_events", 0)))

    async def RecordUsage(
        self, request: metering_pb2.RecordUsageRequest,
        context: ServicerContext[metering_pb2.RecordUsageRequest, metering_pb2.RecordUsageResponse],
    ) -> metering_pb2.RecordUsageResponse:
        caller = identity.require_role(identity.SERVICE)
        # Checked before converting, so an oversized batch costs nothing to refuse.
        if len(request.events) > MAX_BATCH:
            raise InvalidArgument.field(
                "events", f"at most {MAX_BATCH} events per request, got {len(request.events)}")
        now = self._clock()
        events = [convert.usage_event(caller.tenant_id, i, e, now) for i, e in enumerate(request.events)]
        validate_batch(events, now)
        try:
            tenant = await self._tenants.get(caller.tenant_id)
        except NotFound:
            raise InvalidArgument(f"unknown tenant {caller.tenant_id}: no usage recorded",
                                  [FieldViolation("tenant", "the caller's tenant does not exist")],
                                  reason="UNKNOWN_TENANT", metadata={"tenant_id": caller.tenant_id}) from None
        with telemetry.span("usage.record", {"copilot.usage_events": len(events)}) as current:
            result = await self._quota.record(
                events, functools.partial(self._usage.record, redelivery=request.redelivery))
            current.set_attribute("copilot.usage_duplicates", result.duplicates)
        if result.recorded:
            await self._quota.observe(tenant)
        return metering_pb2.RecordUsageResponse(recorded=result.recorded, duplicates=result.duplicates)

    async def GetUsage(
        self, request: metering_pb2.GetUsageRequest,
        context: ServicerContext[metering_pb2.GetUsageRequest, metering_pb2.GetUsageResponse],
    ) -> metering_pb2.GetUsageResponse:
        tenant_id = target_tenant(request.tenant_id)
        now = self._clock()
        start = convert.moment(request.start_time, "start_time") if request.HasField(
            "start_time") else month_start(now)
        end = convert.moment(request.end_time, "end_time") if request.HasField("end_time") else now
        if start >= end:
            raise InvalidArgument.field("start_time", "must be before end_time")
        # No existence check: usage rows outlive a deleted tenant and an operator may audit them.
        window = Window(start, end)
        # The current month from the counters metering keeps anyway; older periods scan.
        totals = await self._usage.current_totals(tenant_id, window, now)
        if totals is None:
            totals = await self._usage.totals(tenant_id, window)
        return convert.usage_response(totals, self._prices)

    def _period(self, request: metering_pb2.ReportBillingRequest | metering_pb2.ReconcileBillingRequest) -> Window:
        now = self._clock()
        end = convert.moment(request.end_time, "end_time") if request.HasField("end_time") else now.replace(
            minute=0, second=0, microsecond=0)
        start = convert.moment(request.start_time, "start_time") if request.HasField("start_time") else end - timedelta(
            hours=1)
        if start >= end:
            raise InvalidArgument.field("start_time", "must be before end_time")
        if end - start > timedelta(days=35):
            raise InvalidArgument.field("start_time", "a billing period is at most 35 days")
        return Window(start, end)

    def _operators_billing(self) -> Billing:
        """Billing, for an operator: refused to anyone else, UNAVAILABLE when it is off."""
        identity.require_role(identity.OPERATOR)
        if self._billing is None:
            raise Unavailable("billing is not configured (STRIPE_API_KEY)", reason="BILLING_DISABLED")
        return self._billing

    async def ReportBilling(
        self, request: metering_pb2.ReportBillingRequest,
        context: ServicerContext[metering_pb2.ReportBillingRequest, metering_pb2.ReportBillingResponse],
    ) -> metering_pb2.ReportBillingResponse:
        report = await self._operators_billing().report(self._period(request))
        return metering_pb2.ReportBillingResponse(meter_events=report.meter_events, tenants=report.tenants)

    async def ReconcileBilling(
        self, request: metering_pb2.ReconcileBillingRequest,
        context: ServicerContext[metering_pb2.ReconcileBillingRequest, metering_pb2.ReconcileBillingResponse],
    ) -> metering_pb2.ReconcileBillingResponse:
        result = await self._operators_billing().reconcile(self._period(request))
        return metering_pb2.ReconcileBillingResponse(tenants=result.tenants, differences=[
            metering_pb2.BillingDifference(tenant_id=d.tenant_id, meter=d.meter, clickhouse=d.clickhouse,
                                           stripe=d.stripe) for d in result.differences])

    async def CheckQuota(
        self, request: metering_pb2.CheckQuotaRequest,
        context: ServicerContext[metering_pb2.CheckQuotaRequest, metering_pb2.CheckQuotaResponse],
    ) -> metering_pb2.CheckQuotaResponse:
        tenant = _ensure_active(await self._tenants.get(identity.tenant_id()))
        decision = await self._quota.check(tenant, request.estimated_tokens)
        if not decision.allowed:
            # The log formatter adds the caller's tenant.
            log.info("quota refused", extra={"quotas": [q.name for q in decision.quotas if q.exceeded]})
        return convert.quota_response(decision)

    async def ReserveQuota(
        self, request: metering_pb2.ReserveQuotaRequest,
        context: ServicerContext[metering_pb2.ReserveQuotaRequest, metering_pb2.ReserveQuotaResponse],
    ) -> metering_pb2.ReserveQuotaResponse:
        # Only the platform's services admit requests: a member holding reservations could
        # lock its own tenant out for their TTL.
        caller = identity.require_role(identity.SERVICE)
        tenant = _ensure_active(await self._tenants.get(caller.tenant_id))
        ttl = convert.duration(request.ttl, "ttl") if request.HasField("ttl") else None
        admission = await self._quota.reserve(tenant, request.reservation_id, request.tokens, ttl)
        if admission.reservation is None:
            log.info("quota refused", extra={"quotas": [q.name for q in admission.decision.quotas if q.exceeded],
                                             "reservation_id": request.reservation_id})
            raise admission.refusal()
        return convert.reserve_response(admission.decision, admission.reservation)

    async def ReleaseQuota(
        self, request: metering_pb2.ReleaseQuotaRequest,
        context: ServicerContext[metering_pb2.ReleaseQuotaRequest, metering_pb2.ReleaseQuotaResponse],
    ) -> metering_pb2.ReleaseQuotaResponse:
        caller = identity.require_role(identity.SERVICE)
        released = await self._quota.release(caller.tenant_id, request.reservation_id)
        return metering_pb2.ReleaseQuotaResponse(released=released)
