"""Quotas: the request that crosses a limit is the first refused; windows reset on time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from servers.common.errors import InvalidArgument, ResourceExhausted
from servers.metering.tenants.domain import Tenant, new_tenant
from servers.metering.tenants.plans import Plan
from servers.metering.usage.domain import QuotaUsage, UsageEvent, UsageKind
from servers.metering.usage.quota import REQUESTS_PER_HOUR, TOKENS_PER_MONTH, QuotaChecker, evaluate
from servers.metering.usage.store import SqliteUsageStore

NOW = datetime(2026, 3, 31, 23, 40, tzinfo=UTC)


def tenant(requests_per_hour: int = 3, tokens_per_month: int = 100) -> Tenant:
    base = new_tenant("acme", "Acme", Plan.FREE, NOW)
    return replace(base, limits=replace(base.limits, requests_per_hour=requests_per_hour,
                                        tokens_per_month=tokens_per_month))


@pytest.fixture
async def usage(tmp_path: Path) -> AsyncIterator[SqliteUsageStore]:
    store = SqliteUsageStore(tmp_path / "usage.sqlite")
    await store.open()
    yield store
    await store.close()


async def record(store: SqliteUsageStore, event_id: str, *, requests: int = 1, tokens: int = 0,
                 at: datetime = NOW) -> None:
    await store.record([UsageEvent(tenant_id="acme", event_id=event_id, kind=UsageKind.QUERY, model="m",
                                   requests=requests, input_tokens=tokens, output_tokens=0, occur_time=at)])


async def test_the_request_that_crosses_the_hourly_limit_is_the_first_refused(
        usage: SqliteUsageStore) -> None:
    checker = QuotaChecker(usage, clock=lambda: NOW)
    acme = tenant(requests_per_hour=3)
    outcomes = []
    for i in range(5):
        decision = await checker.check(acme)
        outcomes.append(decision.allowed)
        if decision.allowed:
            await record(usage, f"req-{i}")
    assert outcomes == [True, True, True, False, False]

    refused = await checker.check(acme)
    hourly = next(q for q in refused.quotas if q.name == REQUESTS_PER_HOUR)
    assert (hourly.limit, hourly.used, hourly.exceeded) == (3, 3, True)
    assert hourly.reset_time == datetime(2026, 4, 1, 0, 0, tzinfo=UTC)
    assert refused.retry_after == timedelta(minutes=20)


async def test_the_hourly_window_resets_at_the_top_of_the_hour(usage: SqliteUsageStore) -> None:
    for i in range(3):
        await record(usage, f"req-{i}", at=NOW)
    acme = tenant(requests_per_hour=3, tokens_per_month=10**9)
    assert not (await QuotaChecker(usage, clock=lambda: NOW).check(acme)).allowed
    next_hour = datetime(2026, 4, 1, 0, 0, tzinfo=UTC)
    assert (await QuotaChecker(usage, clock=lambda: next_hour).check(acme)).allowed


async def test_estimated_tokens_count_against_the_monthly_quota(usage: SqliteUsageStore) -> None:
    checker = QuotaChecker(usage, clock=lambda: NOW)
    acme = tenant(requests_per_hour=1000, tokens_per_month=100)
    await record(usage, "big", tokens=60)
    assert (await checker.check(acme, estimated_tokens=40)).allowed  # exactly reaches the limit
    refused = await checker.check(acme, estimated_tokens=41)
    assert not refused.allowed
    monthly = next(q for q in refused.quotas if q.name == TOKENS_PER_MONTH)
    assert (monthly.used, monthly.limit, monthly.exceeded) == (60, 100, True)
    assert monthly.reset_time == datetime(2026, 4, 1, tzinfo=UTC)
    # Last month's tokens do not count.
    await record(usage, "old", tokens=1000, at=datetime(2026, 2, 28, tzinfo=UTC))
    assert (await checker.check(acme, estimated_tokens=40)).allowed


def test_retry_after_waits_for_every_exceeded_quota() -> None:
    limits = tenant(requests_per_hour=1, tokens_per_month=10).limits
    decision = evaluate("acme", limits, QuotaUsage(requests_in_hour=1, tokens_in_month=10), NOW, 1)
    assert not decision.allowed
    assert decision.retry_after == timedelta(minutes=20)  # both reset at midnight on 1 April
    mid_month = datetime(2026, 3, 10, 12, 15, tzinfo=UTC)
    decision = evaluate("acme", limits, QuotaUsage(requests_in_hour=1, tokens_in_month=10), mid_month, 1)
    assert decision.retry_after == datetime(2026, 4, 1, tzinfo=UTC) - mid_month


def test_refusal_carries_quota_failure_and_retry_info() -> None:
    limits = tenant(requests_per_hour=1).limits
    decision = evaluate("acme", limits, QuotaUsage(requests_in_hour=1, tokens_in_month=0), NOW)
    error = decision.refusal()
    assert isinstance(error, ResourceExhausted)
    assert error.retry_after_s == 20 * 60
    assert [(v.subject, v.description) for v in error.violations] == [("tenant:acme:requests_per_hour", "1 of 1 used")]
    allowed = evaluate("acme", limits, QuotaUsage(requests_in_hour=0, tokens_in_month=0), NOW)
    assert allowed.refusal() is None


def test_negative_estimates_are_invalid() -> None:
    with pytest.raises(InvalidArgument):
        evaluate("acme", tenant().limits, QuotaUsage(0, 0), NOW, -1)
