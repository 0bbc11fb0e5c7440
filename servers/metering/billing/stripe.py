"""Stripe metered billing through Billing Meter Events, and its reconciliation.

* Customers: one Stripe customer per tenant, created when the tenant is onboarded (a
  `TenantHook`) with an idempotency key, and deleted when the tenant is.
* Reporting: usage of closed hours is sent per tenant, hour and meter (requests, tokens)
  as one meter event whose `identifier` is derived from (tenant, meter, hour), and the same
  value as the request's idempotency key: sending a period again, or retrying after a
  429/500/timeout, never counts anything twice in Stripe.
* Rate limits: Stripe's 429s (and 5xx, connection errors) are retried with exponential
  backoff and jitter, honouring Retry-After; events are sent one at a time per process.
* Reconciliation: per tenant and meter, ClickHouse's totals for a period against Stripe's
  meter event summaries for the same period.

The Stripe SDK is blocking: every call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import stripe

from servers.common.errors import Unavailable
from servers.common.retry import Backoff, retry_sync
from servers.common.settings import Settings
from servers.metering.storage import clickhouse
from servers.metering.storage.sqlite import SqliteStore, SqliteWorker, to_micros, transaction
from servers.metering.tenants.domain import Tenant
from servers.metering.tenants.onboarding import TenantHook
from servers.metering.usage.domain import Window
from servers.metering.usage.store import UsageStore

log = logging.getLogger("copilot.metering.billing")

T = TypeVar("T")

REQUESTS_METER = "copilot_requests"
TOKENS_METER = "copilot_tokens"
METERS = {REQUESTS_METER: "Copilot requests", TOKENS_METER: "Copilot tokens"}
HOUR = timedelta(hours=1)
GRACE = timedelta(minutes=5)


@dataclass(frozen=True)
class Report:
    meter_events: int
    tenants: int


@dataclass(frozen=True)
class Difference:
    tenant_id: str
    meter: str
    clickhouse: int
    stripe: int


@dataclass(frozen=True)
class Reconciliation:
    tenants: int
    differences: list[Difference]


class StripeApi:
    """The calls billing makes, with retries and backoff, off the event loop."""

    def __init__(self, api_key: str, api_base: str | None = None, max_attempts: int = 8,
                 base_delay_s: float = 0.2, max_delay_s: float = 10.0) -> None:
        self.client = stripe.StripeClient(api_key, base_addresses={"api": api_base} if api_base else None,
                                          max_network_retries=0)
        self._policy = Backoff(base_s=base_delay_s, cap_s=max_delay_s, max_attempts=max_attempts)
        self.retries = 0

    def _retry_after(self, exc: BaseException) -> float | None:
        """Stripe's Retry-After, as a floor for the wait (bounded by the policy's cap)."""
        headers = getattr(exc, "headers", None) or {}
        retry_after = headers.get("retry-after") or headers.get("Retry-After")
        if retry_after:
            with contextlib.suppress(ValueError):
                return min(self._policy.cap_s, float(retry_after))
        return None

    def _retried(self, exc: BaseException, attempt: int, delay: float) -> None:
        self.retries += 1
        log.info("stripe call retried", extra={"error": type(exc).__name__, "attempt": attempt,
                                               "delay_s": round(delay, 3)})

    def _retrying(self, fn: Callable[[], T]) -> T:
        # Rate limits, 5xx and connection errors; a 4xx other than 429 would fail again.
        return retry_sync(fn, self._policy, on_retry=self._retried, hint=self._retry_after,
                          retryable=lambda exc: isinstance(
                              exc, (stripe.RateLimitError, stripe.APIConnectionError, stripe.APIError)))

    async def call(self, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(self._retrying, fn)
        except stripe.StripeError as exc:
            log.warning("stripe call failed", extra={"error": repr(exc)[:300]})
            raise Unavailable(f"Stripe failed: {exc.user_message or type(exc).__name__}; retry",
                              reason="STRIPE_FAILED") from exc


_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS customers (
        tenant_id TEXT PRIMARY KEY,
        customer_id TEXT NOT NULL
    ) WITHOUT ROWID""",
    # Meter events Stripe accepted: a period reported again sends only what is new (Stripe
    # enforces identifiers for about a day only).
    """CREATE TABLE IF NOT EXISTS reported (
        identifier TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID""",
    "PRAGMA user_version = 1",
)


class Customers(SqliteStore, TenantHook):
    """Tenant → Stripe customer, kept in SQLite; creates and deletes customers."""

    name = "billing"

    def __init__(self, path: Path, api: StripeApi) -> None:
        self._db = SqliteWorker(path, "billing", _SCHEMA)
        self._api = api

    async def customer_of(self, tenant_id: str) -> str | None:
        def select(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT customer_id FROM customers WHERE tenant_id = ?", (tenant_id,)).fetchone()
            return None if row is None else str(row[0])

        return await self._db.call(select)

    async def all(self) -> dict[str, str]:
        def select(conn: sqlite3.Connection) -> dict[str, str]:
            return {t: c for t, c in conn.execute("SELECT tenant_id, customer_id FROM customers")}

        return await self._db.call(select)

    async def ensure(self, tenant_id: str, created: datetime | None = None) -> str:
        existing = await self.customer_of(tenant_id)
        if existing:
            return existing
        key = f"copilot-customer-{tenant_id}-{to_micros(created) if created else 0}"
        customer = await self._api.call(lambda: self._api.client.v1.customers.create(
            params={"name": tenant_id, "metadata": {"tenant_id": tenant_id}}, options={"idempotency_key": key}))

        def save(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO customers (tenant_id, customer_id) VALUES (?, ?) "
                         "ON CONFLICT (tenant_id) DO UPDATE SET customer_id = excluded.customer_id",
                         (tenant_id, customer.id))

        await self._db.call(lambda conn: transaction(conn, save))
        log.info("stripe customer created", extra={"tenant_id": tenant_id, "customer": customer.id})
        return str(customer.id)

    async def reported(self) -> set[str]:
        def select(conn: sqlite3.Connection) -> set[str]:
            return {row[0] for row in conn.execute("SELECT identifier FROM reported")}

        return await self._db.call(select)

    async def mark_reported(self, ident: str, value: int) -> None:
        def save(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO reported (identifier, value) VALUES (?, ?) ON CONFLICT DO NOTHING",
                         (ident, value))

        await self._db.call(lambda conn: transaction(conn, save))

    async def provision(self, tenant: Tenant) -> None:
        await self.ensure(tenant.tenant_id, tenant.create_time)

    async def erase(self, tenant_id: str) -> None:
        customer = await self.customer_of(tenant_id)
        if customer is None:
            return

        def delete() -> None:
            try:
                self._api.client.v1.customers.delete(customer)
            except stripe.InvalidRequestError as exc:
                if exc.http_status != 404:
                    raise

        await self._api.call(delete)

        def remove(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM customers WHERE tenant_id = ?", (tenant_id,))

        await self._db.call(lambda conn: transaction(conn, remove))
        log.info("stripe customer deleted", extra={"tenant_id": tenant_id, "customer": customer})


def identifier(tenant_id: str, meter: str, hour: datetime) -> str:
    return f"{tenant_id}:{meter}:{int(hour.timestamp())}"


class Billing:
    def __init__(self, usage: UsageStore, api: StripeApi, customers: Customers,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._usage = usage
        self.api = api
        self.customers = customers
        self._clock = clock
        self._meters: dict[str, str] = {}  # event name → meter id
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        await self.customers.open()

    async def close(self) -> None:
        await self.customers.close()

    async def meters(self) -> dict[str, str]:
        """The meters billing reports to, created in Stripe when missing."""
        if len(self._meters) == len(METERS):
            return self._meters
        existing = await self.api.call(lambda: self.api.client.v1.billing.meters.list(params={"limit": 100}))
        found = {m.event_name: m.id for m in existing.data if getattr(m, "status", "active") == "active"}
        for event_name, display in METERS.items():
            if event_name not in found:
                found[event_name] = await self.api.call(partial(self._create_meter, event_name, display))
        self._meters = {e: found[e] for e in METERS}
        return self._meters

    def _create_meter(self, event_name: str, display: str) -> str:
        meter = self.api.client.v1.billing.meters.create(
            params={"display_name": display, "event_name": event_name, "default_aggregation": {"formula": "sum"},
                    "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
                    "value_settings": {"event_payload_key": "value"}},
            options={"idempotency_key": f"copilot-meter-{event_name}"})
        return str(meter.id)

    def _closed(self, window: Window) -> Window:
        """The whole hours of `window` that have ended."""
        start = window.start.replace(minute=0, second=0, microsecond=0)
        if start < window.start:
            start += HOUR
        # Hours that ended at least GRACE ago: usage recorded just after an hour ends
        # still lands in it before it is reported.
        now_hour = (self._clock() - GRACE).replace(minute=0, second=0, microsecond=0)
        end = min(window.end, now_hour).replace(minute=0, second=0, microsecond=0)
        return Window(start, max(start, end))

    async def _hourly(self, window: Window) -> dict[tuple[str, int], tuple[int, int]]:
        db = getattr(self._usage, "db", None)
        flush = getattr(self._usage, "flush", None)
        if db is None or flush is None:
            raise Unavailable("billing needs the ClickHouse usage store", reason="BILLING_UNSUPPORTED")
        await flush()
        rows = await db.query(clickhouse.HOURLY_BY_TENANT_SQL, {"start": window.start, "end": window.end})
        return {(row[0], int(row[1])): (int(row[2]), int(row[3])) for row in rows}

    async def report(self, window: Window) -> Report:
        closed = self._closed(window)
        async with self._lock:
            meters = await self.meters()
            del meters  # ensured to exist; events name them by event name
            usage = await self._hourly(closed)
            sent = 0
            done = await self.customers.reported()
            tenants: set[str] = set()
            for (tenant_id, hour_s), (requests, tokens) in sorted(usage.items()):
                customer = await self.customers.ensure(tenant_id)
                hour = datetime.fromtimestamp(hour_s, UTC)
                for meter, value in ((REQUESTS_METER, requests), (TOKENS_METER, tokens)):
                    if value <= 0:
                        continue
                    ident = identifier(tenant_id, meter, hour)
                    if ident in done:
                        continue
                    await self.api.call(partial(self._send, meter, value, ident, hour_s, customer))
                    await self.customers.mark_reported(ident, value)
                    sent += 1
                tenants.add(tenant_id)
        log.info("billing reported", extra={"meter_events": sent, "tenants": len(tenants),
                                            "start": closed.start.isoformat(), "end": closed.end.isoformat()})
        return Report(meter_events=sent, tenants=len(tenants))

    def _send(self, meter: str, value: int, ident: str, hour_s: int, customer: str) -> None:
        try:
            self.api.client.v1.billing.meter_events.create(
                params={"event_name": meter, "identifier": ident, "timestamp": hour_s,
                        "payload": {"stripe_customer_id": customer, "value": str(value)}},
                options={"idempotency_key": ident})
        except stripe.InvalidRequestError as exc:
            # Stripe already holds an event with this identifier (sent before, or a retry
            # whose first attempt was applied): that is the idempotency we want.
            if exc.code != "resource_already_exists" and "already exists" not in str(exc):
                raise

    async def reconcile(self, window: Window) -> Reconciliation:
        closed = self._closed(window)
        meters = await self.meters()
        usage = await self._hourly(closed)
        ours: dict[tuple[str, str], int] = {}
        for (tenant_id, _), (requests, tokens) in usage.items():
            ours[(tenant_id, REQUESTS_METER)] = ours.get((tenant_id, REQUESTS_METER), 0) + requests
            ours[(tenant_id, TOKENS_METER)] = ours.get((tenant_id, TOKENS_METER), 0) + tokens
        customers = await self.customers.all()
        tenants = sorted({t for t, _ in ours} | set(customers))
        differences: list[Difference] = []
        for tenant_id in tenants:
            customer = customers.get(tenant_id)
            for meter in METERS:
                theirs = 0 if customer is None or closed.start >= closed.end else await self._summary(
                    meters[meter], customer, closed)
                mine = ours.get((tenant_id, meter), 0)
                if mine != theirs:
                    differences.append(Difference(tenant_id, meter, mine, theirs))
        return Reconciliation(tenants=len(tenants), differences=differences)

    async def _summary(self, meter_id: str, customer: str, window: Window) -> int:
        def total() -> int:
            value = 0.0
            params: dict[str, Any] = {"customer": customer, "start_time": int(window.start.timestamp()),
                                      "end_time": int(window.end.timestamp()), "limit": 100}
            while True:
                page = self.api.client.v1.billing.meters.event_summaries.list(
                    meter_id, params=params)  # type: ignore[arg-type]
                value += sum(float(s.aggregated_value) for s in page.data)
                if not page.has_more or not page.data:
                    return round(value)
                params["starting_after"] = page.data[-1].id

        return await self.api.call(total)


def billing_from(settings: Settings, usage: UsageStore) -> Billing | None:
    """Billing when STRIPE_API_KEY is set (STRIPE_API_BASE points it at a fake in tests)."""
    if not settings.stripe_api_key:
        return None
    api = StripeApi(settings.stripe_api_key, settings.stripe_api_base)
    return Billing(usage, api, Customers(settings.service_dir("metering") / "billing.sqlite", api))
