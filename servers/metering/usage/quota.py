"""Quota decisions from a tenant's limits and its recorded usage.

Windows are calendar-aligned in UTC (the current hour, the current month), so every
quota has a definite reset time that clients can be told. A check counts the request it
is asked about: with a limit of N requests an hour, checks 1..N pass and N+1 is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from prometheus_client import Counter

from servers.common import metrics, telemetry
from servers.common.errors import InvalidArgument, QuotaViolation, ResourceExhausted
from servers.metering.tenants.domain import Tenant
from servers.metering.tenants.plans import Limits
from servers.metering.usage.domain import (
    MAX_EVENT_ID,
    MAX_QUANTITY,
    QuotaUsage,
    RecordResult,
    UsageEvent,
    hour_window,
    month_window,
)
from servers.metering.usage.ledger import LocalLedger, QuotaLedger, Reservation, Write
from servers.metering.usage.store import UsageStore

REQUESTS_PER_HOUR = "requests_per_hour"
TOKENS_PER_MONTH = "tokens_per_month"
# Percent of a quota at which operators are told (once per tenant, quota and window).
THRESHOLDS = (80, 100)

log = logging.getLogger("copilot.metering.quota")

THRESHOLD_EVENTS = Counter(
    "copilot_quota_threshold_events_total",
    "Tenants reaching a share of a quota (once per tenant, quota and window).", ["quota", "threshold"])


@dataclass(frozen=True)
class QuotaStatus:
    name: str
    limit: int
    used: int
    reset_time: datetime
    # Whether this quota refuses the request being checked.
    exceeded: bool


@dataclass(frozen=True)
class QuotaDecision:
    tenant_id: str
    allowed: bool
    quotas: tuple[QuotaStatus, ...]
    # When refused: until every exceeded quota has reset.
    retry_after: timedelta | None

    def refusal(self) -> ResourceExhausted | None:
        """The RESOURCE_EXHAUSTED error (QuotaFailure + RetryInfo details) for a refused
        decision, for a caller that turns `allowed=false` into an error; None if allowed."""
        if self.allowed:
            return None
        violations = [QuotaViolation(subject=f"tenant:{self.tenant_id}:{q.name}",
                                     description=f"{q.used} of {q.limit} used")
                      for q in self.quotas if q.exceeded]
        retry = self.retry_after.total_seconds() if self.retry_after else 1.0
        return ResourceExhausted(
            f"tenant {self.tenant_id} is over its quota ({', '.join(q.name for q in self.quotas if q.exceeded)})",
            violations, retry_after_s=retry, metadata={"tenant_id": self.tenant_id})


@dataclass(frozen=True)
class Admission:
    """A ReserveQuota's outcome: the decision (as CheckQuota's, `used` before this request)
    and, when allowed, the reservation."""

    decision: QuotaDecision
    reservation: Reservation | None

    def refusal(self) -> ResourceExhausted:
        """The error of a refused reservation (CheckQuota's refusal, one way for both)."""
        error = self.decision.refusal()
        if error is None:
            raise RuntimeError("a refused reservation whose decision allows it")
        return error


def evaluate(tenant_id: str, limits: Limits, usage: QuotaUsage, now: datetime,
             estimated_tokens: int = 0) -> QuotaDecision:
    if estimated_tokens < 0:
        raise InvalidArgument.field("estimated_tokens", "must not be negative")
    hour, month = hour_window(now), month_window(now)
    quotas = (
        QuotaStatus(REQUESTS_PER_HOUR, limits.requests_per_hour, usage.requests_in_hour, hour.end,
                    exceeded=usage.requests_in_hour + 1 > limits.requests_per_hour),
        QuotaStatus(TOKENS_PER_MONTH, limits.tokens_per_month, usage.tokens_in_month, month.end,
                    exceeded=usage.tokens_in_month + estimated_tokens > limits.tokens_per_month),
    )
    exceeded = [q for q in quotas if q.exceeded]
    retry_after = max(q.reset_time - now for q in exceeded) if exceeded else None
    return QuotaDecision(tenant_id=tenant_id, allowed=not exceeded, quotas=quotas, retry_after=retry_after)


class QuotaChecker:
    """Answers CheckQuota, ReserveQuota and ReleaseQuota from the quota ledger (recorded usage
    plus live reservations; by default the usage store's counters and in-process holds)."""

    def __init__(self, usage: UsageStore, clock: Callable[[], datetime] | None = None,
                 ledger: QuotaLedger | None = None, reservation_ttl: timedelta = timedelta(seconds=120),
                 max_reservation_ttl: timedelta = timedelta(seconds=900)) -> None:
        self._usage = usage
        self._clock = clock or (lambda: datetime.now(UTC))
        self.ledger = ledger or LocalLedger(usage)
        self._ttl = reservation_ttl
        self._max_ttl = max_reservation_ttl
        # (tenant, quota, threshold) → start of the window it was last reported for.
        self._emitted: dict[tuple[str, str, int], datetime] = {}

    async def check(self, tenant: Tenant, estimated_tokens: int = 0) -> QuotaDecision:
        if estimated_tokens < 0:
            raise InvalidArgument.field("estimated_tokens", "must not be negative")
        now = self._clock()
        with telemetry.span("quota.evaluate", {"copilot.estimated_tokens": estimated_tokens}) as current:
            usage = await self.ledger.usage(tenant.tenant_id, now)
            decision = evaluate(tenant.tenant_id, tenant.limits, usage, now, estimated_tokens)
            current.set_attribute("copilot.quota_allowed", decision.allowed)
        for q in decision.quotas:
            metrics.QUOTA_LEVELS.observe(tenant.tenant_id, q.name, q.used, q.limit, q.reset_time)
        return decision

    async def reserve(self, tenant: Tenant, reservation_id: str, tokens: int,
                      ttl: timedelta | None = None) -> Admission:
        """Holds 1 request and `tokens` for the tenant if they fit, atomically (see ledger.py).
        `ttl` None: the default; longer than the cap: the cap."""
        if not 1 <= len(reservation_id) <= MAX_EVENT_ID:
            raise InvalidArgument.field("reservation_id", f"required, 1..{MAX_EVENT_ID} characters")
        if not 0 <= tokens <= MAX_QUANTITY:
            raise InvalidArgument.field("tokens", f"must be between 0 and {MAX_QUANTITY}")
        if ttl is not None and ttl <= timedelta(0):
            raise InvalidArgument.field("ttl", "must be positive (or unset for the default)")
        ttl = min(ttl or self._ttl, self._max_ttl)
        now = self._clock()
        with telemetry.span("quota.reserve", {"copilot.reserved_tokens": tokens}) as current:
            hold = await self.ledger.reserve(tenant.tenant_id, tenant.limits, reservation_id, tokens, ttl, now)
            decision = evaluate(tenant.tenant_id, tenant.limits, hold.usage, now,
                                hold.reservation.tokens if hold.reservation else tokens)
            if hold.reservation is not None and not decision.allowed:
                # A retried reserve of a live reservation stands, even if the limits were
                # lowered since it was made.
                decision = replace(decision, allowed=True, retry_after=None,
                                   quotas=tuple(replace(q, exceeded=False) for q in decision.quotas))
            current.set_attribute("copilot.quota_allowed", decision.allowed)
            current.set_attribute("copilot.reservation_existing", hold.existing)
        for q in decision.quotas:
            metrics.QUOTA_LEVELS.observe(tenant.tenant_id, q.name, q.used, q.limit, q.reset_time)
        return Admission(decision, hold.reservation)

    async def release(self, tenant_id: str, reservation_id: str) -> bool:
        if len(reservation_id) > MAX_EVENT_ID:
            raise InvalidArgument.field("reservation_id", f"at most {MAX_EVENT_ID} characters")
        if not reservation_id:
            return False
        return await self.ledger.release(tenant_id, reservation_id, self._clock())

    async def record(self, events: list[UsageEvent], write: Write) -> RecordResult:
        """Records usage through `write`, settling the reservations its events name."""
        return await self.ledger.record(events, write, self._clock())

    async def observe(self, tenant: Tenant) -> list[tuple[str, int]]:
        """After usage was recorded: emits a threshold event (log line + metric) for every
        threshold of a quota that the tenant has newly reached in the current window."""
        now = self._clock()
        hour, month = hour_window(now), month_window(now)
        usage = await self._usage.quota_usage(tenant.tenant_id, hour, month)
        emitted: list[tuple[str, int]] = []
        for name, used, limit, window in (
                (REQUESTS_PER_HOUR, usage.requests_in_hour, tenant.limits.requests_per_hour, hour),
                (TOKENS_PER_MONTH, usage.tokens_in_month, tenant.limits.tokens_per_month, month)):
            metrics.QUOTA_LEVELS.observe(tenant.tenant_id, name, used, limit, window.end)
            for threshold in THRESHOLDS:
                if limit <= 0 or used * 100 < limit * threshold:
                    continue
                key = (tenant.tenant_id, name, threshold)
                if self._emitted.get(key) == window.start:
                    continue
                self._emitted[key] = window.start
                THRESHOLD_EVENTS.labels(name, str(threshold)).inc()
                log.warning("quota threshold reached", extra={
                    "tenant_id": tenant.tenant_id, "quota": name, "threshold_percent": threshold,
                    "used": used, "limit": limit, "window_start": window.start.isoformat()})
                emitted.append((name, threshold))
        if len(self._emitted) > 100_000:
            self._emitted.clear()
        return emitted
