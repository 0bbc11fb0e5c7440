"""What the usage and audit stores share: recorded events are queued, a writer task takes them
in groups, drops the ids already recorded (in the log or in ClickHouse) and appends the rest
to the durable log; a flusher task moves them into ClickHouse.

Entries appended to the log wait in `_pending` (log order) until a flush inserts them into
ClickHouse and commits them in the log; the flusher retries a failed flush with backoff and
keeps the error for health and `copilot status`. Each store writes its own group
(`_write_group`: usage counts quotas, audit chains hashes) and flushes its own rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from servers.common.errors import Unavailable
from servers.common.retry import Backoff
from servers.metering.storage.clickhouse import ClickHouseBackend
from servers.metering.storage.log import LogEntry, UsageLog

log = logging.getLogger("copilot.metering.flusher")

# Ids asked of ClickHouse per query when checking which are already stored.
LOOKUP_CHUNK = 2_000
# A failed flush is retried until ClickHouse takes it (the events are safe in the log meanwhile).
FLUSH_RETRY = Backoff(base_s=0.1, cap_s=5.0)


class Keyed(Protocol):
    @property
    def tenant_id(self) -> str: ...

    @property
    def event_id(self) -> str: ...


E = TypeVar("E", bound=Keyed)
R = TypeVar("R")


@dataclass
class WriteRequest(Generic[E, R]):
    """One `record` call: its events, and the future its caller awaits."""

    events: Sequence[E]
    future: asyncio.Future[R]
    # False: the ids are fresh, so only the unflushed events are searched, not ClickHouse.
    check_stored: bool = True


Q = TypeVar("Q", bound=WriteRequest[Any, Any])


class LogFlusher(Generic[Q]):
    _flush_name = "log"  # in the logs, errors and task names: "usage", "audit"
    # `SELECT DISTINCT event_id` of a {tenant:String} among {ids:Array(String)} in the store's table.
    _existing_sql = ""

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

    # --- Lifecycle -----------------------------------------------------------------------

    async def _open_log(self) -> None:
        """Takes back what the log holds unflushed (a stop or a crash before the flush) and
        moves it into ClickHouse before serving — some of it may be there already (a crash
        between an insert and the log's commit), and reads add the log to ClickHouse — then
        starts the writer and the flusher."""
        entries = await self.log.open()
        for entry in entries:
            self._add_pending(entry)
        if entries:
            log.info(f"replaying unflushed {self._flush_name} events",
                     extra={"entries": len(entries), "events": sum(len(e.events) for e in entries)})
            self._replaying()
            await self.flush()
        self._start_tasks()

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

    async def _close_log(self) -> None:
        """Lets queued writes and the last flush finish, refuses what is left, closes the log."""
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
        ClickHouse is asked, so the answer from memory is taken first."""
        in_log: set[tuple[str, str]] = set()
        candidates: dict[str, set[str]] = {}
        for request in group:
            for e in request.events:
                key = (e.tenant_id, e.event_id)
                if key in self._pending_keys:
                    in_log.add(key)
                elif request.check_stored:
                    candidates.setdefault(e.tenant_id, set()).add(e.event_id)
        return in_log | await self._stored_keys(candidates)

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
