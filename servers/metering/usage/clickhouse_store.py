"""Usage kept in ClickHouse, fed through a durable log, with real-time quota counters.

    RecordUsage ─► writer (group commit) ─► UsageLog (fsync) ─► ack
                                               │
                                   flusher ────┴─► ClickHouse (batched inserts) ─► log commit

* Idempotency: an id is claimed only by a successful append. The writer handles all the
  batches waiting at once (one append, one fsync for all of them) and, for each event,
  looks for its (tenant, id) among the events in the log not yet flushed (in memory) and
  then in ClickHouse (a primary-key lookup). Checking memory first is what makes this
  race-free with the flusher, which inserts into ClickHouse before it forgets an id.
* Reads (`totals`) are ClickHouse (FINAL) plus the unflushed events, taken under the lock
  the flusher holds while it moves a batch, so no event is seen in both or in neither.
* Quotas: per tenant and month, hourly (requests, tokens) counters loaded once from the
  same two sources and then moved by every acknowledged event, so `CheckQuota` reads
  memory and sees every acknowledged event at once.
* Usage of the current month (`current_totals`, what `GetUsage` asks by default): beside
  the quota counters, per hour and model sums of the recorded events only, loaded in the
  same query and moved when an event enters the log after dedupe (`_add_pending`, in the
  step that makes it visible to `totals`), so they equal ClickHouse + the log at every
  moment. The quota counters also count events still being written; these do not.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from servers.common.lru import LruCache
from servers.metering.storage import clickhouse
from servers.metering.storage.clickhouse import ClickHouseBackend
from servers.metering.storage.flusher import LogFlusher, WriteRequest
from servers.metering.storage.log import LogEntry, UsageLog
from servers.metering.storage.sqlite import to_micros
from servers.metering.usage.domain import (
    ModelUsage,
    QuotaUsage,
    RecordResult,
    UsageEvent,
    UsageTotals,
    Window,
    month_start,
    month_window,
    next_month,
)
from servers.metering.usage.store import UsageStore

log = logging.getLogger("copilot.metering.usage")

# Loaded (tenant, month) counters kept in memory; the least recently used go first.
MAX_COUNTERS = 10_000
# Hours of usage kept one by one per tenant-month (older ones are summed): windows that
# start on one of the last day's hours, or at the month's start, are answered from memory.
USAGE_HOURS_KEPT = 48

# A usage event id may come again without being marked a redelivery (RecordUsageRequest):
# when Envoy retries an Answer on another generation replica (the same edge request id, so the
# same event id), within the route's longest stream (900 s, envoy/envoy.yaml.tmpl) and the
# usage call's own timeouts after it; and gRPC's or Envoy's retries of one RecordUsage call,
# within seconds. 20 minutes covers all of them with room.
FIRST_DELIVERY_SPAN_S = 1200.0
# The ids stored since a moment, to remember them after a start (flusher.RecentKeys).
RECENT_SQL = (f"SELECT tenant_id, event_id FROM {clickhouse.TABLE} "
              f"WHERE record_time >= {{since:DateTime64(6, 'UTC')}}")

# What seeds a tenant-month's counters: per hour and model, the sums `totals` reports, and
# the first and last occur_time, which say whether a window that cuts the hour takes all
# of it or none of it.
HOURLY_USAGE_SQL = (
    f"SELECT toUnixTimestamp(toStartOfHour(occur_time)), model, sum(requests), sum(input_tokens), "
    f"sum(output_tokens), count(), toUnixTimestamp64Micro(min(occur_time)), "
    f"toUnixTimestamp64Micro(max(occur_time)) "
    f"FROM {clickhouse.TABLE} FINAL WHERE tenant_id = {{tenant:String}} "
    f"AND occur_time >= {{start:DateTime64(6, 'UTC')}} AND occur_time < {{end:DateTime64(6, 'UTC')}} "
    f"GROUP BY 1, 2")


@dataclass
class _Request(WriteRequest[UsageEvent, RecordResult]):
    # Per event: the counters it was provisionally added to on arrival (None: not loaded then).
    counted: list[_MonthCounters | None] = field(default_factory=list)


@dataclass(slots=True)
class _HourUsage:
    # Model → [requests, input_tokens, output_tokens, events] of the recorded events.
    models: dict[str, list[int]] = field(default_factory=dict)
    # Earliest and latest occur_time (Unix µs) of those events.
    first: int = 2**63
    last: int = -(2**63)

    def add(self, model: str, requests: int, input_tokens: int, output_tokens: int, events: int,
            first: int, last: int) -> None:
        sums = self.models.get(model)
        if sums is None:
            self.models[sys.intern(model)] = [requests, input_tokens, output_tokens, events]
        else:
            sums[0] += requests
            sums[1] += input_tokens
            sums[2] += output_tokens
            sums[3] += events
        self.first = min(self.first, first)
        self.last = max(self.last, last)

    def merge(self, other: _HourUsage) -> None:
        for model, (requests, input_tokens, output_tokens, events) in other.models.items():
            self.add(model, requests, input_tokens, output_tokens, events, other.first, other.last)


@dataclass
class _MonthCounters:
    # Month start (Unix seconds).
    month: int
    # Hour start (Unix seconds) → [requests, tokens], events being written included (quotas).
    hours: dict[int, list[int]] = field(default_factory=dict)
    tokens: int = 0
    # The recorded events' sums (usage reads): per hour for the last USAGE_HOURS_KEPT hours
    # of events seen, and summed per model for the hours before `folded_until` (Unix
    # seconds), which bounds the memory of a busy month to about two days of hours.
    usage: dict[int, _HourUsage] = field(default_factory=dict)
    folded: _HourUsage = field(default_factory=_HourUsage)
    folded_until: int = 0

    def add(self, hour: int, requests: int, tokens: int) -> None:
        bucket = self.hours.setdefault(hour, [0, 0])
        bucket[0] += requests
        bucket[1] += tokens
        self.tokens += tokens

    def recorded(self, e: UsageEvent) -> None:
        """An event now in the log, after dedupe: never taken back (only erased with the tenant)."""
        at = to_micros(e.occur_time)
        self.add_usage(_hour_of(e.occur_time), e.model, e.requests, e.input_tokens, e.output_tokens, 1, at, at)

    def add_usage(self, hour: int, model: str, requests: int, input_tokens: int, output_tokens: int,
                  events: int, first: int, last: int) -> None:
        if hour < self.folded_until:
            self.folded.add(model, requests, input_tokens, output_tokens, events, first, last)
            return
        bucket = self.usage.get(hour)
        if bucket is None:
            bucket = self.usage[hour] = _HourUsage()
            # Events are at most a day ahead of the clock (validate_batch): hours older than
            # the newest one seen less USAGE_HOURS_KEPT are a day or more in the past.
            fold_until = hour - USAGE_HOURS_KEPT * 3600
            if fold_until > self.folded_until:
                for old in [h for h in self.usage if h < fold_until]:
                    self.folded.merge(self.usage.pop(old))
                self.folded_until = fold_until
        bucket.add(model, requests, input_tokens, output_tokens, events, first, last)

    def totals(self, tenant_id: str, window: Window) -> UsageTotals | None:
        """The recorded usage in `window` (within this month), or None when only ClickHouse can
        split it: an hour the window cuts has events on both sides of the cut, or the window
        takes part of the folded hours (all of them are taken from the month's start on)."""
        start, end = to_micros(window.start), to_micros(window.end)
        models: dict[str, list[int]] = {}
        if self.folded.models:
            if start <= self.month * 1_000_000 and end >= self.folded_until * 1_000_000:
                for model, sums in self.folded.models.items():
                    models[model] = list(sums)
            elif start < self.folded_until * 1_000_000:
                return None
        for hour_s, hour in self.usage.items():
            hour_start = hour_s * 1_000_000
            hour_end = hour_start + 3_600_000_000
            if hour_end <= start or hour_start >= end:
                continue
            if hour_start < start or hour_end > end:  # the window cuts this hour
                inside = start <= hour.first and hour.last < end
                if not inside:
                    if hour.last < start or hour.first >= end:
                        continue  # all of it outside
                    return None
            for model, sums in hour.models.items():
                total = models.get(model)
                if total is None:
                    models[model] = list(sums)
                else:
                    for i in range(4):
                        total[i] += sums[i]
        return UsageTotals(tenant_id=tenant_id, start=window.start, end=window.end,
                           by_model=tuple(ModelUsage(name, *models[name]) for name in sorted(models)))


def _hour_of(moment: datetime) -> int:
    return int(moment.timestamp()) // 3600 * 3600


def _month_key(tenant_id: str, moment: datetime) -> tuple[str, int]:
    return tenant_id, int(month_start(moment).timestamp())


class ClickHouseUsageStore(LogFlusher[_Request], UsageStore):
    _flush_name = "usage"
    _existing_sql = clickhouse.EXISTING_SQL
    _recent_sql = RECENT_SQL
    first_delivery_span_s = FIRST_DELIVERY_SPAN_S

    def __init__(self, db: ClickHouseBackend, usage_log: UsageLog, *, flush_interval_s: float = 0.2,
                 flush_max_events: int = 50_000, max_group_events: int = 20_000) -> None:
        super().__init__(db, usage_log, flush_interval_s, flush_max_events, max_group_events)
        self._pending_events = 0
        # Held while a batch moves from pending to ClickHouse, and by readers that combine both.
        self._move_lock = asyncio.Lock()
        self._counters: LruCache[tuple[str, int], _MonthCounters] = LruCache(MAX_COUNTERS)
        self._to_commit: list[LogEntry] = []
        self.flushed_events = 0

    # --- Lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        await self.db.open()
        await self._open_log()

    async def close(self) -> None:
        await self._close_log()
        await self.db.close()

    async def ping(self) -> bool:
        # ClickHouse only: with the log (e.g. Redis) down, RecordUsage answers UNAVAILABLE
        # by itself, while quotas, usage queries and tenants keep serving.
        return await self.db.ping()

    @property
    def pending_events(self) -> int:
        return self._pending_events

    # --- Recording -----------------------------------------------------------------------

    async def record(self, events: Sequence[UsageEvent], redelivery: bool = True) -> RecordResult:
        self._ensure_open()
        request = _Request(events, asyncio.get_running_loop().create_future(), check_stored=redelivery)
        # Counted at once, before the write: a quota check that arrives while this batch is
        # being made durable already sees it. Duplicates are taken back once known, and
        # everything if the write fails.
        request.counted = [self._provisional(e, +1) for e in events]
        result: RecordResult = await self._enqueue(request)
        return result

    async def _write_group(self, group: list[_Request]) -> None:
        # In memory first (see the module docstring), then ClickHouse.
        known = await self._recorded_keys(group)
        seen: set[tuple[str, str]] = set()
        results: list[RecordResult] = []
        new: list[UsageEvent] = []
        fresh: list[list[bool]] = []
        for request in group:
            flags = []
            for e in request.events:
                key = (e.tenant_id, e.event_id)
                is_new = key not in known and key not in seen
                flags.append(is_new)
                if is_new:
                    seen.add(key)
                    new.append(e)
            fresh.append(flags)
            recorded = sum(flags)
            results.append(RecordResult(recorded=recorded, duplicates=len(request.events) - recorded))
        if new:
            entry = await self.log.append(new, datetime.now(UTC))
            # From here to the end: no await, so readers never see half of it.
            self._add_pending(entry)
        for request, flags in zip(group, fresh, strict=True):
            self._settle_counts(request, flags)
        if new and self._pending_events >= self._flush_max:
            self._wake_flusher.set()
        self._resolve(group, results)

    def _dropped(self, request: _Request) -> None:
        self._settle_counts(request, [False] * len(request.events))

    def _add_pending(self, entry: LogEntry) -> None:
        super()._add_pending(entry)
        self._pending_events += len(entry.events)
        # The moment these events become recorded (deduped, durable, visible to `totals`).
        for e in entry.events:
            counters = self._counters.peek(_month_key(e.tenant_id, e.occur_time))
            if counters is not None:
                counters.recorded(e)

    def _provisional(self, e: UsageEvent, sign: int) -> _MonthCounters | None:
        if (e.tenant_id, e.event_id) in self._pending_keys:
            return None  # a known duplicate: never counted
        counters = self._counters.peek(_month_key(e.tenant_id, e.occur_time))
        if counters is not None:
            counters.add(_hour_of(e.occur_time), sign * e.requests, sign * e.tokens)
        return counters

    def _settle_counts(self, request: _Request, fresh: list[bool]) -> None:
        """After the write: takes back the provisional count of what was not recorded, and
        counts what was recorded but could not be counted on arrival (its counters were not
        loaded then, or were reloaded since, without it)."""
        if not request.counted:
            return
        for e, counted, is_new in zip(request.events, request.counted, fresh, strict=True):
            current = self._counters.peek(_month_key(e.tenant_id, e.occur_time))
            if current is None:
                continue
            if is_new and counted is not current:
                current.add(_hour_of(e.occur_time), e.requests, e.tokens)
            elif not is_new and counted is current:
                current.add(_hour_of(e.occur_time), -e.requests, -e.tokens)
        request.counted = []

    # --- Flushing ------------------------------------------------------------------------

    async def flush_once(self) -> int:
        async with self._move_lock:
            batch, size = self._oldest_batch()
            if not batch:
                return 0
            rows = [(e.tenant_id, e.event_id, e.kind.value, e.model, e.requests, e.input_tokens,
                     e.output_tokens, e.occur_time, entry.record_time, dict(e.attributes))
                    for entry in batch for e in entry.events]
            started = time.monotonic()
            await self.db.insert(rows)
            self._take_flushed(batch)
            self._pending_events -= size
        # Committed after the insert: a crash in between replays the batch, which ClickHouse
        # collapses (same key) and FINAL never double counts. A failed commit is retried
        # with the next one; the events are stored either way.
        self._to_commit.extend(batch)
        try:
            await self.log.commit(self._to_commit)
            self._to_commit.clear()
        except Exception as exc:
            log.warning("usage log commit failed; retried with the next one", extra={"error": repr(exc)[:300]})
        self.flushed_events += size
        log.debug("usage flushed", extra={"events": size, "ms": round((time.monotonic() - started) * 1000, 1)})
        return size

    # --- Reading -------------------------------------------------------------------------

    def _pending_for(self, tenant_id: str, window: Window) -> list[UsageEvent]:
        return [e for entry in self._pending for e in entry.events
                if e.tenant_id == tenant_id and window.start <= e.occur_time < window.end]

    async def totals(self, tenant_id: str, window: Window) -> UsageTotals:
        async with self._move_lock:
            rows = await self.db.query(clickhouse.TOTALS_SQL,
                                       {"tenant": tenant_id, "start": window.start, "end": window.end})
            pending = self._pending_for(tenant_id, window)
        models: dict[str, list[int]] = {row[0]: [int(v) for v in row[1:]] for row in rows}
        for e in pending:
            m = models.setdefault(e.model, [0, 0, 0, 0])
            m[0] += e.requests
            m[1] += e.input_tokens
            m[2] += e.output_tokens
            m[3] += 1
        return UsageTotals(tenant_id=tenant_id, start=window.start, end=window.end,
                           by_model=tuple(ModelUsage(name, *models[name]) for name in sorted(models)))

    async def _month_counters(self, tenant_id: str, moment: datetime) -> _MonthCounters:
        key = _month_key(tenant_id, moment)
        counters = self._counters.get(key)
        if counters is not None:
            return counters
        start = month_start(moment)
        window = Window(start, next_month(start))
        async with self._move_lock:
            rows = await self.db.query(HOURLY_USAGE_SQL,
                                       {"tenant": tenant_id, "start": window.start, "end": window.end})
            # Another check may have loaded it meanwhile; events since are counted there.
            # From the pending events read to `put`: no await, so an event entering the log
            # is counted either here or by `_add_pending`, never both, never neither.
            counters = self._counters.peek(key)
            if counters is None:
                counters = _MonthCounters(int(start.timestamp()))
                for hour, model, requests, input_tokens, output_tokens, events, first, last in sorted(
                        rows, key=lambda row: int(row[0])):
                    counters.add(int(hour), int(requests), int(input_tokens) + int(output_tokens))
                    counters.add_usage(int(hour), str(model), int(requests), int(input_tokens), int(output_tokens),
                                       int(events), int(first), int(last))
                for e in self._pending_for(tenant_id, window):
                    counters.add(_hour_of(e.occur_time), e.requests, e.tokens)
                    counters.recorded(e)
                self._counters.put(key, counters)
        return counters

    async def current_totals(self, tenant_id: str, window: Window, now: datetime) -> UsageTotals | None:
        month = month_window(now)
        if window.start < month.start or window.end > month.end:
            return None
        counters = await self._month_counters(tenant_id, month.start)
        return counters.totals(tenant_id, window)

    async def quota_usage(self, tenant_id: str, hour: Window, month: Window) -> QuotaUsage:
        if hour.start.minute or hour.start.second or hour.start.microsecond or \
                month.start != month_start(month.start):
            raise ValueError("quota windows must start on the hour and the month")
        counters = await self._month_counters(tenant_id, month.start)
        hour_start = _hour_of(hour.start)
        requests = sum(v[0] for h, v in counters.hours.items() if hour_start <= h < _hour_of(hour.end))
        return QuotaUsage(requests_in_hour=requests, tokens_in_month=counters.tokens)

    async def forget_tenant(self, tenant_id: str, anonymise: bool) -> None:
        await self.flush()
        async with self._move_lock:
            if anonymise:
                anonymous = f"deleted-{uuid.uuid4().hex[:16]}"
                await self.db.command(clickhouse.ANONYMISE_SQL, {"tenant": tenant_id, "anonymous": anonymous})
            await self.db.command(clickhouse.DELETE_TENANT_SQL, {"tenant": tenant_id})
            self.forget(tenant_id)
        log.info("usage of a deleted tenant " + ("anonymised" if anonymise else "erased"),
                 extra={"tenant_id": tenant_id})

    def forget(self, tenant_id: str) -> None:
        """Drops a tenant's counters (after its usage was erased)."""
        self._counters.drop(lambda key: key[0] == tenant_id)

    async def interval_totals(self, window: Window) -> dict[str, tuple[int, int]]:
        """tenant → (requests, tokens) with occur_time in `window`, after a flush."""
        await self.flush()
        rows = await self.db.query(clickhouse.INTERVAL_SQL, {"start": window.start, "end": window.end})
        return {row[0]: (int(row[1]), int(row[2])) for row in rows}

    async def stored_count(self, tenant_id: str) -> int:
        rows: list[list[Any]] = await self.db.query(clickhouse.COUNT_SQL, {"tenant": tenant_id})
        return int(rows[0][0])
