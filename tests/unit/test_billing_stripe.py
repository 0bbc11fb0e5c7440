"""Stripe metered billing through the real `stripe` SDK against a local fake Stripe:
meter events per tenant and hour with idempotent identifiers, 429/500/503 retried without
loss or doubling, reconciliation with ClickHouse reporting zero differences."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from servers.metering.billing.stripe import (
    REQUESTS_METER,
    TOKENS_METER,
    Billing,
    Customers,
    StripeApi,
)
from servers.metering.storage.clickhouse import ChdbBackend
from servers.metering.storage.log import LocalLog
from servers.metering.usage.clickhouse_store import ClickHouseUsageStore
from servers.metering.usage.domain import UsageEvent, UsageKind, Window
from tests.fakes.stripe_server import FakeStripe, Fault

NOW = datetime.now(UTC).replace(minute=30, second=0, microsecond=0)
HOUR = NOW.replace(minute=0)
PERIOD = Window(HOUR - timedelta(hours=6), HOUR + timedelta(hours=1))


def event(event_id: str, tenant: str, at: datetime, requests: int = 1, tokens: int = 10) -> UsageEvent:
    return UsageEvent(tenant_id=tenant, event_id=event_id, kind=UsageKind.QUERY, model="m1", requests=requests,
                      input_tokens=tokens, output_tokens=0, occur_time=at)


@pytest.fixture
def stripe_fake() -> Iterator[FakeStripe]:
    with FakeStripe() as fake:
        yield fake


@pytest.fixture
async def usage(tmp_path: Path) -> AsyncIterator[ClickHouseUsageStore]:
    """The usage store billing reads (the test records into it, as metering's RecordUsage does)."""
    store = ClickHouseUsageStore(ChdbBackend(tmp_path / "chdb"), LocalLog(tmp_path / "log"))
    await store.open()
    yield store
    await store.close()


@pytest.fixture
async def billing(tmp_path: Path, stripe_fake: FakeStripe, usage: ClickHouseUsageStore) -> AsyncIterator[Billing]:
    api = StripeApi("sk_test_fake", stripe_fake.url, base_delay_s=0.01, max_delay_s=0.05)
    b = Billing(usage, api, Customers(tmp_path / "billing.sqlite", api), clock=lambda: NOW)
    await b.open()
    yield b
    await b.close()


async def test_report_is_exact_idempotent_and_reconciles_to_zero(billing: Billing, usage: ClickHouseUsageStore,
                                                                 stripe_fake: FakeStripe) -> None:
    for tenant in ("acme", "globex"):
        await billing.customers.ensure(tenant)
    await usage.record([
        *(event(f"a{i}", "acme", HOUR - timedelta(hours=3) + timedelta(minutes=i), tokens=7) for i in range(5)),
        *(event(f"b{i}", "acme", HOUR - timedelta(hours=1) + timedelta(minutes=i)) for i in range(3)),
        *(event(f"g{i}", "globex", HOUR - timedelta(hours=2), requests=2) for i in range(4)),
        event("open-hour", "acme", HOUR + timedelta(minutes=1)),  # not closed: not billed yet
    ])
    # Rate limited, a server error before anything happened, and one after the event was
    # applied but its answer lost: all retried, nothing lost, nothing doubled.
    stripe_fake.state.faults.extend([Fault(429, retry_after=0.01), Fault(503), Fault(429)])
    report = await billing.report(PERIOD)
    assert (report.meter_events, report.tenants) == (6, 2)
    customers = await billing.customers.all()
    state = stripe_fake.state
    assert state.totals(customers["acme"], REQUESTS_METER) == 8
    assert state.totals(customers["acme"], TOKENS_METER) == 5 * 7 + 3 * 10
    assert state.totals(customers["globex"], REQUESTS_METER) == 8
    assert billing.api.retries >= 3
    assert (await billing.reconcile(PERIOD)).differences == []

    # Reported again (the daily job runs twice): nothing new is sent, nothing changes.
    again = await billing.report(PERIOD)
    assert again.meter_events == 0
    assert state.totals(customers["acme"], REQUESTS_METER) == 8
    reconciliation = await billing.reconcile(PERIOD)
    assert (reconciliation.tenants, reconciliation.differences) == (2, [])


async def test_a_lost_response_is_retried_without_doubling(billing: Billing, usage: ClickHouseUsageStore,
                                                           stripe_fake: FakeStripe) -> None:
    await billing.customers.ensure("acme")
    await billing.meters()
    await usage.record([event("x", "acme", HOUR - timedelta(hours=2), requests=3, tokens=4)])
    stripe_fake.state.faults.append(Fault(500, after_apply=True))
    assert (await billing.report(PERIOD)).meter_events == 2
    customer = (await billing.customers.all())["acme"]
    assert stripe_fake.state.totals(customer, REQUESTS_METER) == 3
    assert stripe_fake.state.totals(customer, TOKENS_METER) == 4
    assert len(stripe_fake.state.events) == 2
    assert (await billing.reconcile(PERIOD)).differences == []


async def test_reconciliation_reports_what_differs(billing: Billing, usage: ClickHouseUsageStore,
                                                   stripe_fake: FakeStripe) -> None:
    await billing.customers.ensure("acme")
    await usage.record([event("x", "acme", HOUR - timedelta(hours=2))])
    await billing.report(PERIOD)
    # Usage that arrived after its hour was reported, and nothing else.
    await usage.record([event("late", "acme", HOUR - timedelta(hours=2), requests=2, tokens=0)])
    differences = (await billing.reconcile(PERIOD)).differences
    assert [(d.tenant_id, d.meter, d.clickhouse, d.stripe) for d in differences] == [
        ("acme", REQUESTS_METER, 3, 1)]


async def test_customers_are_created_once_and_deleted_with_the_tenant(billing: Billing,
                                                                      stripe_fake: FakeStripe) -> None:
    first = await billing.customers.ensure("acme")
    assert await billing.customers.ensure("acme") == first
    assert list(stripe_fake.state.customers) == [first]
    await billing.customers.erase("acme")
    await billing.customers.erase("acme")  # idempotent
    assert stripe_fake.state.customers == {}
    assert await billing.customers.customer_of("acme") is None
