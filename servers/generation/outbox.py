"""A durable local outbox for usage events: no answer unbilled, none billed twice.

Every answer's usage event is written here (one small file per event, fsync'd, directory
fsync'd) while its first delivery to Metering is attempted; the file is removed once
Metering has acknowledged it. Whatever is left — Metering unreachable, the process killed
between the answer and the acknowledgement — is delivered by a background loop, and again
on the next start, always with the same event id, which Metering deduplicates.

Writes are group-committed: events that arrive while a write is being fsync'd are written
together by the next one (one file, one fsync, one directory fsync), so under load the disk
sees one fsync per group instead of one per answer, with no added wait when idle. Each
event is still durable before `record` reports it safe. A lone event keeps its own file,
named after its tenant and id; a group's file holds several events (any tenants) and is
removed once every event in it has been acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from copilot.v1 import metering_pb2
from servers.common import metrics, telemetry

log = logging.getLogger("copilot.generation.outbox")

MAX_BACKOFF_S = 5.0
# Events written by one group commit at most (one file; bounded so a file stays small).
MAX_GROUP = 256


@dataclass(frozen=True)
class Pending:
    tenant_id: str
    event: metering_pb2.UsageEvent
    path: Path
    # The answer's trace (W3C traceparent): a later delivery links back to it.
    parent: str | None = None


# Sends a batch of one tenant's events; raises when they were not acknowledged.
Deliver = Callable[[str, list[metering_pb2.UsageEvent]], Awaitable[None]]


@dataclass
class _Write:
    tenant_id: str
    event: metering_pb2.UsageEvent
    parent: str | None
    # Resolved with the file the event is in once that file is durable.
    done: asyncio.Future[Path]


@dataclass
class _Group:
    """A file written by one commit while its events are still being settled."""

    outstanding: int
    undelivered: int = 0


def _safe_name(event_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in event_id)


class UsageOutbox:
    def __init__(self, directory: Path, deliver: Deliver, interval_s: float = 1.0, batch: int = 100) -> None:
        self._dir = directory
        self._dir.mkdir(parents=True, exist_ok=True)
        self._deliver = deliver
        self._interval = interval_s
        self._batch = batch
        self._inflight: set[Path] = set()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._backlog = False
        self._settling: set[asyncio.Future[None]] = set()
        self._writes: list[_Write] = []
        self._committer: asyncio.Future[None] | None = None
        self._groups: dict[Path, _Group] = {}
        self.delivered = 0
        self.commits = 0
        # Read at scrape time, on the metrics thread (a directory listing, off the event loop).
        metrics.SOURCES.gauge(*metrics.USAGE_OUTBOX_DEPTH, self.pending_count)

    # --- files (blocking; run in a thread) ---------------------------------------------

    def _path(self, tenant_id: str, event_id: str) -> Path:
        return self._dir / f"{tenant_id}~{_safe_name(event_id)}.json"

    @staticmethod
    def _entry(tenant_id: str, event: metering_pb2.UsageEvent, parent: str | None) -> dict[str, object]:
        return {"tenant_id": tenant_id, "event": json_format.MessageToDict(event), "trace": parent}

    def _write_group(self, path: Path, writes: list[_Write]) -> None:
        """One file for the group: a lone event in the single-event format, several as a list."""
        if len(writes) == 1:
            w = writes[0]
            self._write(path, w.tenant_id, w.event, w.parent)
        else:
            self._write_body(path, json.dumps(
                {"events": [self._entry(w.tenant_id, w.event, w.parent) for w in writes]}).encode())

    def _write(self, path: Path, tenant_id: str, event: metering_pb2.UsageEvent, parent: str | None = None) -> None:
        self._write_body(path, json.dumps(self._entry(tenant_id, event, parent)).encode())

    def _write_body(self, path: Path, body: bytes) -> None:
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self._fsync_dir()

    def _fsync_dir(self) -> None:
        fd = os.open(self._dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _remove(self, paths: list[Path]) -> None:
        for path in paths:
            path.unlink(missing_ok=True)

    def _scan(self) -> list[Pending]:
        pending: list[Pending] = []
        for path in sorted(self._dir.glob("*.json")):
            if path in self._inflight:
                continue
            try:
                raw = json.loads(path.read_bytes())
                entries = raw.get("events", [raw])
                pending.extend(Pending(tenant_id=e["tenant_id"], path=path, parent=e.get("trace"),
                                       event=json_format.ParseDict(e["event"], metering_pb2.UsageEvent()))
                               for e in entries)
            except (OSError, ValueError, KeyError, json_format.ParseError):
                log.exception("unreadable outbox entry kept aside", extra={"path": str(path)})
                path.rename(path.with_suffix(".bad"))
        return pending

    # --- the answer path -----------------------------------------------------------------

    async def record(self, tenant_id: str, event: metering_pb2.UsageEvent) -> bool:
        """Delivers the event and makes it durable here, both at once, and returns as soon as
        either is done (so an answer is never returned before its usage is safe, and costs
        only the faster of the two). False when Metering refused it or could not be reached:
        then it waits here for the background loop."""
        write = self._durable(tenant_id, event, telemetry.traceparent())
        send = asyncio.ensure_future(self._deliver(tenant_id, [event]))
        settle = asyncio.ensure_future(self._settle(event.event_id, write, send))
        self._settling.add(settle)
        settle.add_done_callback(self._settling.discard)
        both: set[asyncio.Future[Any]] = {write, send}
        while True:
            done, _ = await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
            if send in done and send.exception() is None:
                return True
            if send in done or (write in done and write.exception() is not None):
                # Delivery failed (the write decides durability), or the write failed (only
                # delivery can make it safe): the answer must wait for the other one.
                await asyncio.wait(both)
                return send.exception() is None
            if write in done:
                return True  # durable here; delivery goes on in the background

    def _durable(self, tenant_id: str, event: metering_pb2.UsageEvent, parent: str | None) -> asyncio.Future[Path]:
        """Queues the event for the next group commit; the future resolves (with its file)
        once the event is on disk, or fails with the write's error."""
        write = _Write(tenant_id, event, parent, asyncio.get_running_loop().create_future())
        self._writes.append(write)
        if self._committer is None or self._committer.done():
            self._committer = asyncio.ensure_future(self._commit())
        return write.done

    async def _commit(self) -> None:
        """Writes whatever is queued, one file and one fsync per round, until nothing is."""
        while self._writes:
            group, self._writes = self._writes[:MAX_GROUP], self._writes[MAX_GROUP:]
            if len(group) == 1:
                path = self._path(group[0].tenant_id, group[0].event.event_id)
            else:
                path = self._dir / f"group~{uuid.uuid4().hex}.json"
            # In flight before the file exists: the background scan leaves it to us.
            self._inflight.add(path)
            self._groups[path] = _Group(outstanding=len(group))
            try:
                await asyncio.to_thread(self._write_group, path, group)
            except BaseException as exc:
                for w in group:
                    if not w.done.done():
                        w.done.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
                self._groups.pop(path, None)
                self._inflight.discard(path)
                if not isinstance(exc, Exception):
                    raise
                continue
            self.commits += 1
            for w in group:
                if not w.done.done():
                    w.done.set_result(path)

    async def _settle(self, event_id: str, write: asyncio.Future[Path], send: asyncio.Future[None]) -> None:
        both: set[asyncio.Future[Any]] = {write, send}
        await asyncio.wait(both)
        write_error, send_error = write.exception(), send.exception()
        path = write.result() if write_error is None else None
        if write_error is not None:
            log.error("usage outbox write failed", extra={"event_id": event_id, "error": repr(write_error)})
        if send_error is not None:
            log.warning("usage kept in the outbox for later delivery",
                        extra={"event_id": event_id, "error": repr(send_error)})
            self._backlog = True
            self._wake.set()
        else:
            self.delivered += 1
            if self._backlog:  # Metering is back: deliver what waited, now
                self._backlog = False
                self._wake.set()
        if path is not None:
            await self._release(path, delivered=send_error is None)

    async def _release(self, path: Path, delivered: bool) -> None:
        """One event of the file at `path` is settled; the file goes once all its events
        were acknowledged, or is left to the background loop if any was not."""
        group = self._groups.get(path)
        if group is None:
            return
        group.outstanding -= 1
        if not delivered:
            group.undelivered += 1
        if group.outstanding:
            return
        del self._groups[path]
        try:
            if group.undelivered == 0:
                await asyncio.to_thread(self._remove, [path])
        finally:
            self._inflight.discard(path)

    # --- background delivery -------------------------------------------------------------

    def pending_count(self) -> int:
        """Files waiting here (a group commit's file holds several events)."""
        return sum(1 for _ in self._dir.glob("*.json"))

    async def flush(self) -> int:
        """Delivers what is pending now; the number delivered."""
        pending = await asyncio.to_thread(self._scan)
        by_tenant: dict[str, list[Pending]] = {}
        for item in pending:
            by_tenant.setdefault(item.tenant_id, []).append(item)
        # A file goes once every event in it was delivered (a group's file may hold several
        # tenants' events).
        left = Counter(item.path for item in pending)
        done = 0
        for tenant_id, items in by_tenant.items():
            for start in range(0, len(items), self._batch):
                chunk = items[start:start + self._batch]
                # Its own trace (this runs in the background), linked to every answer it bills.
                links = [link for p in chunk for link in telemetry.link_to(p.parent)]
                with telemetry.span("usage.outbox.deliver", {
                        "tenant.id": tenant_id, "enduser.id": "service:generation",
                        "copilot.usage_events": len(chunk)}, links=links):
                    await self._deliver(tenant_id, [p.event for p in chunk])
                left.subtract(p.path for p in chunk)
                await asyncio.to_thread(self._remove, sorted({p.path for p in chunk if left[p.path] <= 0}))
                done += len(chunk)
        self.delivered += done
        return done

    async def _loop(self) -> None:
        failures = 0
        while True:
            delay = self._interval if failures == 0 else min(MAX_BACKOFF_S, self._interval * 2 ** failures)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay * random.uniform(0.8, 1.2))
            self._wake.clear()
            try:
                started = time.monotonic()
                done = await self.flush()
                failures = 0
                if done:
                    log.info("outbox delivered", extra={"events": done,
                                                        "ms": round((time.monotonic() - started) * 1000, 1)})
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures = min(failures + 1, 6)
                self._backlog = True
                log.warning("outbox delivery failed; will retry", extra={"error": repr(exc)})

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="usage-outbox")
            self._wake.set()  # replay what an earlier run left

    async def settled(self, timeout_s: float = 5.0) -> None:
        """Waits until every recorded event is either delivered or on disk (no work in flight)."""
        if self._settling:
            await asyncio.wait(set(self._settling), timeout=timeout_s)

    async def stop(self) -> None:
        await self.settled()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await asyncio.wait_for(self.flush(), timeout=2)
        except Exception:
            log.warning("outbox not empty at shutdown; delivered on next start",
                        extra={"pending": self.pending_count()})
