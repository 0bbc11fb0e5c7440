"""The two background tasks of the usage and audit stores: a writer that appends batches of
recorded events to the durable log, and a flusher that moves them into ClickHouse.

Entries appended to the log wait in `_pending` (log order) until a flush inserts them into
ClickHouse and commits them in the log; the flusher retries a failed flush with backoff and
keeps the error for health and `copilot status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Coroutine
from typing import Any

from servers.metering.usagelog import LogEntry

log = logging.getLogger("copilot.metering.flusher")


class LogFlusher:
    _flush_name = "log"  # in the logs and task names: "usage", "audit"

    def __init__(self, flush_interval_s: float, flush_max: int) -> None:
        self._flush_interval = flush_interval_s
        self._flush_max = flush_max
        self._wake_writer = asyncio.Event()
        self._wake_flusher = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # Appended, not yet in ClickHouse: entries in log order.
        self._pending: deque[LogEntry] = deque()
        self._closing = False
        self.last_flush_error: str | None = None

    def _start_tasks(self, writer: Coroutine[Any, Any, None]) -> None:
        self._closing = False
        self._tasks = [asyncio.create_task(writer, name=f"{self._flush_name}-writer"),
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

    async def _flush_pending(self) -> None:
        """Moves what is pending into ClickHouse (the store's own batching)."""
        raise NotImplementedError

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
        backoff = 0.1
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_flusher.wait(), self._flush_interval)
            self._wake_flusher.clear()
            try:
                await self._flush_pending()
                backoff = 0.1
                self.last_flush_error = None
            except Exception as exc:
                self.last_flush_error = repr(exc)
                log.warning(f"{self._flush_name} flush failed; will retry",
                            extra={"error": repr(exc)[:300], "pending_entries": len(self._pending)})
                if self._closing:
                    return
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if self._closing:
                return
