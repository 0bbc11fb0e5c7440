"""What the usage and audit stores share: recorded events are queued, a writer task takes them
in groups, drops the ids already recorded (in the log or in ClickHouse) and appends the rest
to the durable log; a flusher task moves them into ClickHouse.

Which ids were recorded before costs a ClickHouse query per write group, unless memory can
prove an id new (`RecentKeys`): a first delivery (the caller says it did not send these ids
before) of an id this process has not recorded within the store's `first_delivery_span_s`
is new, because the only way the same id comes again without being marked a redelivery is
within that span of its first recording (docs/idempotency-lookup.md).
Redeliveries, and first deliveries memory cannot vouch for (just after a start, before the
recent ids are loaded; a store other writers share), are looked up in ClickHouse as before.

Entries appended to the log wait in `_pending` (log order) until a flush inserts them into
ClickHouse and commits them in the log; the flusher retries a failed flush with backoff and
keeps the error for health and `copilot status`. Each store writes its own group
(`_write_group`: usage counts quotas, audit chains hashes) and flushes its own rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, Protocol, TypeVar

from servers.common.errors import Unavailable
from servers.common.retry import Backoff
from servers.metering.storage.clickhouse import ChdbBackend, ClickHouseBackend
from servers.metering.storage.log import LogEntry, UsageLog

log = logging.getLogger("copilot.metering.flusher")

# Ids asked of ClickHouse per query when checking which are already stored.
LOOKUP_CHUNK = 2_000
# A failed flush is retried until ClickHouse takes it (the events are safe in the log meanwhile).
FLUSH_RETRY = Backoff(base_s=0.1, cap_s=5.0)
# Ids a generation of recent ids holds (`RecentKeys`: 1 MiB of filter each, two of them): a
# span of ids beyond it (usage's 20 minutes at over ~700 events/s) ends the generation early,
# and first deliveries are looked up in ClickHouse until memory covers the span again.
RECENT_MAX_IDS = 800_000
# The recent ids are loaded from ClickHouse by record_time from this much before the span,
# for a wall clock stepped back or forth meanwhile (the replaced process ran on this host).
RECENT_LOAD_MARGIN_S = 60.0


class Keyed(Protocol):
    @property
    def tenant_id(self) -> str: ...

    @property
    def event_id(self) -> str: ...


E = TypeVar("E", bound=Keyed)
R = TypeVar("R")


class _Bloom:
    """A set of 64-bit hashes in a fixed bit array: a member is always found; a non-member is
    found with a probability of ~1.5 % at `capacity` members, far less below (10 bits and 3
    probes a member)."""

    PROBES = 3

    def __init__(self, capacity: int) -> None:
        self.mask = (1 << max(10, (capacity * 10 - 1).bit_length())) - 1
        self.bits = bytearray((self.mask + 1) // 8)
        self.count = 0

    def _positions(self, h: int) -> Iterator[int]:
        low, high = h & 0xFFFFFFFF, ((h >> 32) & 0xFFFFFFFF) | 1
        return ((low + i * high) & self.mask for i in range(self.PROBES))

    def add(self, h: int) -> None:
        for p in self._positions(h):
            self.bits[p >> 3] |= 1 << (p & 7)
        self.count += 1

    def __contains__(self, h: int) -> bool:
        return all(self.bits[p >> 3] & (1 << (p & 7)) for p in self._positions(h))


class RecentKeys:
    """Which (tenant, event id) keys this process recorded lately, as a filter of their
    hashes: a key not in it was not recorded here since `since` (monotonic seconds); a key in
    it may have been (filters err that way), so it is looked up.

    Two generations of filter: keys go into the current one; when it is `span_s` old (or
    full: `capacity` keys) it becomes the previous one and the previous one is dropped, so
    memory is fixed (~1.25 bytes a key of capacity, twice) and, once running, covers at
    least the last `span_s` seconds. `since` starts at the store's open, moves back once the
    ids stored before the open are loaded (`loaded`), and forward when a generation is
    dropped."""

    def __init__(self, span_s: float, capacity: int = RECENT_MAX_IDS) -> None:
        self.span_s = span_s
        self._capacity = capacity
        self.since = time.monotonic()
        self._started = self.since
        self._current = _Bloom(capacity)
        self._previous: _Bloom | None = None
        # Memory misses keys recorded before this (monotonic seconds): a generation was dropped.
        self._dropped_until = float("-inf")

    def __len__(self) -> int:
        return self._current.count + (self._previous.count if self._previous is not None else 0)

    def restart(self, now: float | None = None) -> None:
        """Forgets everything: memory is complete from `now` (a store's open)."""
        self.since = self._started = time.monotonic() if now is None else now
        self._current = _Bloom(self._capacity)
        self._previous = None

    def _rotate(self, now: float, full: bool = False) -> None:
        if not full and now - self._started < self.span_s:
            return
        if self._previous is not None:
            self._dropped_until = self._started
            self.since = max(self.since, self._dropped_until)
        self._previous, self._current, self._started = self._current, _Bloom(self._capacity), now

    def add(self, keys: Iterable[tuple[str, str]], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._rotate(now)
        for key in keys:
            if self._current.count >= self._capacity:
                self._rotate(now, full=True)
            self._current.add(hash(key))

    def maybe_recorded(self, key: tuple[str, str]) -> bool:
        h = hash(key)
        return h in self._current or (self._previous is not None and h in self._previous)

    def covers_span(self, now: float | None = None) -> bool:
        """Whether every key recorded here in the last `span_s` seconds may be found."""
        now = time.monotonic() if now is None else now
        self._rotate(now)
        return now - self.since >= self.span_s

    def loaded(self, keys: Iterable[tuple[str, str]], from_monotonic: float) -> None:
        """Every key stored from `from_monotonic` on (by an earlier process too) besides those
        added here: memory is complete from then, or from the last drop since."""
        self.add(keys)
        self.since = min(self.since, max(from_monotonic, self._dropped_until))


@dataclass
class WriteRequest(Generic[E, R]):
    """One `record` call: its events, and the future its caller awaits."""

    events: Sequence[E]
    future: asyncio.Future[R]
    # False: a first delivery (the caller did not send these ids before), so ClickHouse is
    # asked only about ids memory cannot prove new (`RecentKeys`); True: a redelivery.
    check_stored: bool = True


Q = TypeVar("Q", bound=WriteRequest[Any, Any])


class LogFlusher(Generic[Q]):
    _flush_name = "log"  # in the logs, errors and task names: "usage", "audit"
    # `SELECT DISTINCT event_id` of a {tenant:String} among {ids:Array(String)} in the store's table.
    _existing_sql = ""
    # `SELECT tenant_id, event_id` of the rows with record_time >= {since:DateTime64(6, 'UTC')}.
    _recent_sql = ""
    # The longest time after an id's first recording in which the same id may come again
    # without being marked a redelivery (retries nobody marks: gRPC's and Envoy's). Past it,
    # a first delivery of an id not recorded here within that time is new.
    first_delivery_span_s = 0.0

    def __init__(self, db: ClickHouseBackend, event_log: UsageLog, flush_interval_s: float, flush_max: int,
                 max_group: int | None = None) -> None:
        self.db = db
        self.log = event_log
        self._flush_interval = flush_interval_s
        self._flush_max = flush_max
        # Events per written group at most (None: all that is queued).
        self._max_group = max_group
        self._queue: deque[Q] = deque()
        self._wake_writer = asyncio.Event()
        self._wake_flusher = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # Appended, not yet in ClickHouse: entries in log order, and their events' keys.
        self._pending: deque[LogEntry] = deque()
        self._pending_keys: set[tuple[str, str]] = set()
        # Log entries appended / moved to ClickHouse since start: `flush` moves what was
        # appended when it began, not what keeps coming meanwhile.
        self._appended = 0
        self._flushed = 0
        self._closing = False
        self.last_flush_error: str | None = None
        # Only where this process is the table's one writer (the embedded chDB, locked to one
        # process): another writer's ids would not be in memory.
        self._recent: RecentKeys | None = RecentKeys(self.first_delivery_span_s) if isinstance(
            db, ChdbBackend) and self.first_delivery_span_s > 0 else None
        self._recent_loader: asyncio.Task[None] | None = None
        # Write groups whose first deliveries memory vouched for / that asked ClickHouse.
        self.lookups_skipped = 0
        self.lookups = 0

    # --- Lifecycle -----------------------------------------------------------------------

    async def _open_log(self) -> None:
        """Takes back what the log holds unflushed (a stop or a crash before the flush) and
        moves it into ClickHouse before serving — some of it may be there already (a crash
        between an insert and the log's commit), and reads add the log to ClickHouse — then
        starts the writer and the flusher."""
        if self._recent is not None:
            # From now on every key recorded here is added; those stored before the open
            # (by the process this one replaces) are loaded in the background.
            self._recent.restart()
        entries = await self.log.open()
        for entry in entries:
            self._add_pending(entry)
            if self._recent is not None:
                self._recent.add((e.tenant_id, e.event_id) for e in entry.events)
        if entries:
            log.info(f"replaying unflushed {self._flush_name} events",
                     extra={"entries": len(entries), "events": sum(len(e.events) for e in entries)})
            self._replaying()
            await self.flush()
        self._start_tasks()
        if self._recent is not None:
            self._recent_loader = asyncio.create_task(self._load_recent(self._recent),
                                                      name=f"{self._flush_name}-recent-ids")

    async def recent_ids_loaded(self) -> None:
        """Returns once the ids stored before the open are in memory (or could not be loaded):
        for tests and drills; serving never waits for it."""
        if self._recent_loader is not None:
            await asyncio.shield(self._recent_loader)

    async def _load_recent(self, recent: RecentKeys) -> None:
        """Loads the ids stored within the span before now, so first deliveries skip ClickHouse
        at once after a start instead of a span later. Until it is done (or if it fails),
        they are looked up as before."""
        from_monotonic = time.monotonic() - recent.span_s
        since = datetime.now(UTC) - timedelta(seconds=recent.span_s + RECENT_LOAD_MARGIN_S)
        try:
            rows = await self.db.query(self._recent_sql, {"since": since})
        except Exception as exc:
            log.warning(f"could not load the recent {self._flush_name} ids; first deliveries are "
                        f"looked up in ClickHouse for {recent.span_s:.0f} s", extra={"error": repr(exc)[:300]})
            return
        recent.loaded(((row[0], row[1]) for row in rows), from_monotonic)
        log.info(f"recent {self._flush_name} ids loaded", extra={"ids": len(rows)})

    def _replaying(self) -> None:
        """Called before the replayed entries are flushed."""

    async def abandon(self) -> None:
        """Stops as a crash (kill -9) would: the writer and the flusher are cancelled, nothing
        queued is written, nothing pending is flushed or committed in the log; the log and the
        database are left open as they are, for the caller to close. For crash-recovery tests
        and drills: `close()` is the orderly stop."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self._stop_recent_loader()

    async def _stop_recent_loader(self) -> None:
        if self._recent_loader is not None:
            self._recent_loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recent_loader
            self._recent_loader = None

    async def _close_log(self) -> None:
        """Lets queued writes and the last flush finish, refuses what is left, closes the log."""
        await self._stop_recent_loader()
        await self._stop_tasks()
        self._fail_queued()
        await self.log.close()

    # --- Recording -----------------------------------------------------------------------

    def _ensure_open(self) -> None:
        if self._closing or not self._tasks:
            raise Unavailable(f"the {self._flush_name} store is not open", reason="STORE_CLOSED")

    async def _enqueue(self, request: Q) -> Any:
        """Queues the request for the writer and waits for its result. The write goes on if
        the caller goes away; only its answer is dropped."""
        self._queue.append(request)
        self._wake_writer.set()
        return await asyncio.shield(request.future)

    async def _writer(self) -> None:
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            while self._queue:
                group: list[Q] = []
                size = 0
                while self._queue and (not group or self._max_group is None
                                       or size + len(self._queue[0].events) <= self._max_group):
                    request = self._queue.popleft()
                    group.append(request)
                    size += len(request.events)
                try:
                    await self._write_group(group)
                except Exception as exc:
                    self._fail(group, exc)
            if self._closing:
                return

    async def _write_group(self, group: list[Q]) -> None:
        """Appends the group's new events to the log and resolves every request's future."""
        raise NotImplementedError

    async def _recorded_keys(self, group: Sequence[Q]) -> set[tuple[str, str]]:
        """Keys of the group's events recorded before: in the log (not flushed yet) or in
        ClickHouse. Only the writer adds pending keys; the flusher may remove some while
        ClickHouse is asked, so the answer from memory is taken first. ClickHouse is asked
        about a key unless it is a first delivery that memory proves new (module docstring).
        The keys found new are remembered as recorded before they are appended (a failed
        append leaves them there: they are only looked up again)."""
        in_log: set[tuple[str, str]] = set()
        candidates: dict[str, set[str]] = {}
        recent = self._recent
        trusted = recent is not None and recent.covers_span()
        skipped = False
        for request in group:
            for e in request.events:
                key = (e.tenant_id, e.event_id)
                if key in self._pending_keys:
                    in_log.add(key)
                elif request.check_stored or not trusted or recent is None or recent.maybe_recorded(key):
                    candidates.setdefault(e.tenant_id, set()).add(e.event_id)
                else:
                    skipped = True
        if candidates:
            self.lookups += 1
        elif skipped:
            self.lookups_skipped += 1
        known = in_log | await self._stored_keys(candidates)
        if recent is not None:
            recent.add((e.tenant_id, e.event_id) for request in group for e in request.events
                       if (e.tenant_id, e.event_id) not in known)
        return known

    async def _stored_keys(self, candidates: dict[str, set[str]]) -> set[tuple[str, str]]:
        found: set[tuple[str, str]] = set()
        for tenant_id, ids in candidates.items():
            ordered = sorted(ids)
            for i in range(0, len(ordered), LOOKUP_CHUNK):
                rows = await self.db.query(self._existing_sql,
                                           {"tenant": tenant_id, "ids": ordered[i:i + LOOKUP_CHUNK]})
                found.update((tenant_id, row[0]) for row in rows)
        return found

    def _resolve(self, group: Sequence[Q], results: Sequence[Any]) -> None:
        for request, result in zip(group, results, strict=True):
            if not request.future.done():
                request.future.set_result(result)

    def _fail(self, group: Sequence[Q], exc: Exception) -> None:
        """The group was not recorded: every caller gets UNAVAILABLE (retry is safe: ids dedupe)."""
        error = exc if isinstance(exc, Unavailable) else Unavailable(
            f"{self._flush_name} events could not be recorded; retry", reason="STORE_FAILED")
        if not isinstance(exc, Unavailable):
            log.exception(f"{self._flush_name} write failed")
        for request in group:
            self._dropped(request)
            if not request.future.done():
                request.future.set_exception(error)

    def _dropped(self, request: Q) -> None:
        """A request that will not be recorded (failed, or still queued at close)."""

    def _fail_queued(self) -> None:
        while self._queue:
            request = self._queue.popleft()
            self._dropped(request)
            if not request.future.done():
                request.future.set_exception(
                    Unavailable(f"the {self._flush_name} store is closing", reason="STORE_CLOSED"))

    # --- Flushing ------------------------------------------------------------------------

    def _add_pending(self, entry: LogEntry) -> None:
        """An entry now durable in the log (written, or replayed at open)."""
        self._pending.append(entry)
        self._appended += 1
        self._pending_keys.update((e.tenant_id, e.event_id) for e in entry.events)

    def _take_flushed(self, batch: Sequence[LogEntry]) -> None:
        """The oldest pending entries, now in ClickHouse, leave the pending set."""
        for entry in batch:
            self._pending.popleft()
            self._flushed += 1
            self._pending_keys.difference_update((e.tenant_id, e.event_id) for e in entry.events)

    async def flush_once(self) -> int:
        """Moves the oldest pending entries (up to `flush_max` events) into ClickHouse; their
        event count."""
        raise NotImplementedError

    async def flush(self) -> None:
        """Moves everything appended so far into ClickHouse (tests, shutdown, reads)."""
        target = self._appended
        while self._pending and self._flushed < target:
            await self.flush_once()

    def _start_tasks(self) -> None:
        self._closing = False
        self._tasks = [asyncio.create_task(self._writer(), name=f"{self._flush_name}-writer"),
                       asyncio.create_task(self._flusher(), name=f"{self._flush_name}-flusher")]

    async def _stop_tasks(self) -> None:
        """Lets the writer finish what is queued and the flusher its last round, then returns."""
        self._closing = True
        self._wake_writer.set()
        self._wake_flusher.set()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def _oldest_batch(self) -> tuple[list[LogEntry], int]:
        """The oldest pending entries, up to `flush_max` events (at least one entry), and
        their event count."""
        batch: list[LogEntry] = []
        size = 0
        for entry in self._pending:
            if batch and size + len(entry.events) > self._flush_max:
                break
            batch.append(entry)
            size += len(entry.events)
        return batch, size

    async def _flusher(self) -> None:
        failures = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_flusher.wait(), self._flush_interval)
            self._wake_flusher.clear()
            try:
                await self.flush()
                failures = 0
                self.last_flush_error = None
            except Exception as exc:
                self.last_flush_error = repr(exc)
                log.warning(f"{self._flush_name} flush failed; will retry",
                            extra={"error": repr(exc)[:300], "pending_entries": len(self._pending)})
                if self._closing:
                    return
                failures += 1
                await asyncio.sleep(FLUSH_RETRY.delay(failures))
                continue
            if self._closing:
                return
