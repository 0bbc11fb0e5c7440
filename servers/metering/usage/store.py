"""Where usage events are kept.

`UsageStore` is the storage interface; `SqliteUsageStore` is the embedded default
(`clickhouse_store.ClickHouseUsageStore` the one for ClickHouse).
"""

from __future__ import annotations

import json
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from servers.metering.storage.sqlite import SqliteStore, SqliteWorker, to_micros, transaction
from servers.metering.usage.domain import ModelUsage, QuotaUsage, RecordResult, UsageEvent, UsageTotals, Window


class UsageStore(ABC):
    """Where usage events are kept. Implementations are safe to call concurrently."""

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Acquires resources; called once before use."""

    @abstractmethod
    async def record(self, events: Sequence[UsageEvent], redelivery: bool = True) -> RecordResult:
        """Stores a validated batch atomically and returns only once it is durable.

        Events whose (tenant_id, event_id) is already stored count as duplicates and
        change nothing. If the write fails, nothing of the batch is stored and no id is
        claimed, so a retry of the same batch records it in full. `redelivery` False: the
        caller did not send these ids before (a store may look for them more cheaply then;
        duplicates still count as duplicates).
        """

    @abstractmethod
    async def totals(self, tenant_id: str, window: Window) -> UsageTotals:
        """Usage of the tenant with occur_time in `window`, per model."""

    async def current_totals(self, tenant_id: str, window: Window, now: datetime) -> UsageTotals | None:
        """`totals` from memory when the store keeps the window's usage there (the month of
        `now`), exactly equal to `totals`; None when only a scan can answer."""
        return None

    @abstractmethod
    async def quota_usage(self, tenant_id: str, hour: Window, month: Window) -> QuotaUsage:
        """Requests in `hour` and tokens in `month` (the hour lies within the month)."""

    @abstractmethod
    async def ping(self) -> bool:
        """Whether the store answers."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Releases resources."""

    async def forget_tenant(self, tenant_id: str, anonymise: bool) -> None:  # noqa: B027 - optional
        """After a tenant's deletion: its usage rows are anonymised (moved to an anonymous
        id, attributes dropped) or erased. Stores that cannot do either keep them."""


HOUR_US = 3_600_000_000

_USAGE_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS usage_events (
        tenant_id TEXT NOT NULL,
        event_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        model TEXT NOT NULL,
        requests INTEGER NOT NULL,
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        occur_time_us INTEGER NOT NULL,
        record_time_us INTEGER NOT NULL,
        attributes TEXT NOT NULL,
        PRIMARY KEY (tenant_id, event_id)
    ) WITHOUT ROWID""",
    # Covers the totals query, so it reads the index alone.
    """CREATE INDEX IF NOT EXISTS usage_by_time ON usage_events
        (tenant_id, occur_time_us, model, requests, input_tokens, output_tokens)""",
    # Per-tenant hourly sums, so a quota check reads at most a month of hours instead of
    # a month of events.
    """CREATE TABLE IF NOT EXISTS usage_hourly (
        tenant_id TEXT NOT NULL,
        hour_us INTEGER NOT NULL,
        requests INTEGER NOT NULL,
        tokens INTEGER NOT NULL,
        events INTEGER NOT NULL,
        PRIMARY KEY (tenant_id, hour_us)
    ) WITHOUT ROWID""",
    # Kept by a trigger, inside the very transaction that inserts the event: it fires only
    # for rows actually inserted (never for a duplicate id) and rolls back with them, so
    # the sums cannot drift from the events.
    """CREATE TRIGGER IF NOT EXISTS usage_hourly_rollup AFTER INSERT ON usage_events BEGIN
        INSERT INTO usage_hourly (tenant_id, hour_us, requests, tokens, events)
        VALUES (NEW.tenant_id, NEW.occur_time_us - NEW.occur_time_us % 3600000000, NEW.requests,
                NEW.input_tokens + NEW.output_tokens, 1)
        ON CONFLICT (tenant_id, hour_us) DO UPDATE SET
            requests = requests + excluded.requests, tokens = tokens + excluded.tokens,
            events = events + 1;
    END""",
    "PRAGMA user_version = 1",
)


class SqliteUsageStore(SqliteStore, UsageStore):
    """The embedded default: one SQLite database (WAL, synchronous=FULL so a committed
    batch survives a crash or power loss) under the data directory."""

    def __init__(self, path: Path) -> None:
        self._db = SqliteWorker(path, "usage", _USAGE_SCHEMA, synchronous="FULL")

    async def record(self, events: Sequence[UsageEvent], redelivery: bool = True) -> RecordResult:
        # The primary key dedupes every write at no extra cost: `redelivery` changes nothing.
        recorded_at = to_micros(datetime.now(UTC))
        rows = [(e.tenant_id, e.event_id, e.kind.value, e.model, e.requests, e.input_tokens,
                 e.output_tokens, to_micros(e.occur_time), recorded_at,
                 json.dumps(dict(e.attributes), sort_keys=True)) for e in events]

        def insert(conn: sqlite3.Connection) -> int:
            # rowcount sums the rows each INSERT itself added: skipped duplicates add none
            # and, unlike total_changes, the rollup trigger's writes are not counted.
            cursor = conn.executemany(
                "INSERT INTO usage_events (tenant_id, event_id, kind, model, requests, input_tokens, "
                "output_tokens, occur_time_us, record_time_us, attributes) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant_id, event_id) DO NOTHING",
                rows)
            return cursor.rowcount

        recorded = await self._db.call(lambda conn: transaction(conn, insert))
        return RecordResult(recorded=recorded, duplicates=len(rows) - recorded)

    async def totals(self, tenant_id: str, window: Window) -> UsageTotals:
        def select(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return conn.execute(
                "SELECT model, SUM(requests), SUM(input_tokens), SUM(output_tokens), COUNT(*) "
                "FROM usage_events WHERE tenant_id = ? AND occur_time_us >= ? AND occur_time_us < ? "
                "GROUP BY model ORDER BY model",
                (tenant_id, to_micros(window.start), to_micros(window.end))).fetchall()

        rows = await self._db.call(select)
        return UsageTotals(tenant_id=tenant_id, start=window.start, end=window.end,
                           by_model=tuple(ModelUsage(*row) for row in rows))

    async def quota_usage(self, tenant_id: str, hour: Window, month: Window) -> QuotaUsage:
        bounds = [to_micros(t) for t in (hour.start, hour.end, month.start, month.end)]
        if any(b % HOUR_US for b in bounds):
            raise ValueError("quota windows must start and end on the hour")

        def select(conn: sqlite3.Connection) -> tuple[int, int]:
            row = conn.execute(
                "SELECT COALESCE(SUM(CASE WHEN hour_us >= ? AND hour_us < ? THEN requests ELSE 0 END), 0), "
                "       COALESCE(SUM(tokens), 0) "
                "FROM usage_hourly WHERE tenant_id = ? AND hour_us >= ? AND hour_us < ?",
                (bounds[0], bounds[1], tenant_id, bounds[2], bounds[3])).fetchone()
            return int(row[0]), int(row[1])

        requests, tokens = await self._db.call(select)
        return QuotaUsage(requests_in_hour=requests, tokens_in_month=tokens)
