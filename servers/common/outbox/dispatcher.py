"""The outbox's delivery: `Outbox`, events for Metering (usage, audit) that must arrive exactly once.

Every event is made durable in the journal (journal.py) and delivered to Metering; its file
is removed once Metering has acknowledged it. Whatever is left — Metering unreachable, the
process killed between the write and the acknowledgement — is delivered by a background
loop, and again on the next start, always with the same event id, which Metering
deduplicates (redeliveries say so, so Metering checks for duplicates only then).

Writes are group-committed: events that arrive while a write is being fsync'd are written
together by the next one (one file, one fsync, one directory fsync), so under load the disk
sees one fsync per group instead of one per event, with no added wait when idle.

Two ways in:
- `record` (usage): delivery and the write start together and the caller waits for the
  faster of the two, so an answer never returns before its usage is safe.
- `submit` (audit): returns at once with a future that resolves once the event's group is
  on disk; the event is delivered after that, batched per tenant with the others of that
  group. A caller that awaits the future before it answers OK (the audit trail does) never
  acknowledges an event a crash could lose, and never waits for the delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from servers.common import metrics, telemetry
from servers.common.outbox.journal import Journal, Pending, event_id
from servers.common.retry import Backoff

log = logging.getLogger("copilot.outbox")

MAX_BACKOFF_S = 5.0
# Events written by one group commit at most (one file; bounded so a file stays small).
MAX_GROUP = 256

M = TypeVar("M", bound=Message)

# Sends a batch of one tenant's events (the flag: some may have been sent before); raises
# when they were not acknowledged.
Deliver = Callable[[str, list[Any], bool], Awaitable[None]]


@dataclass
class _Write(Generic[M]):
    tenant_id: str
    event: M
    parent: str | None
    # Resolved with the file the event is in once that file is durable.
    done: asyncio.Future[Path]


@dataclass
class _Group:
    """A file written by one commit while its events are still being settled."""

    outstanding: int
    undelivered: int = 0


class Outbox(Generic[M]):
    """Events of type `message` (each with an `event_id` field), delivered by `deliver`.

    `name` names the background task, the logs and the delivery span (`<name>.deliver`);
    `actor` is the span's enduser (the service writing on the tenant's behalf);
    `depth_metric` (name, help) exports the number of files waiting here."""

    def __init__(self, directory: Path, deliver: Deliver, message: type[M], *, name: str = "outbox",
                 actor: str = "service", interval_s: float = 1.0, batch: int = 100,
                 depth_metric: tuple[str, str] | None = None) -> None:
        self._journal = Journal(directory, message)
        self._deliver = deliver
        self._name = name
        self._actor = actor
        self._interval = interval_s
        # After a failed delivery: from twice the interval up to MAX_BACKOFF_S.
        self._retry = Backoff(base_s=2 * interval_s, cap_s=MAX_BACKOFF_S)
        self._batch = batch
        self._inflight: set[Path] = set()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._backlog = False
        self._settling: set[asyncio.Future[None]] = set()
        self._writes: list[_Write[M]] = []
        self._committer: asyncio.Future[None] | None = None
        self._groups: dict[Path, _Group] = {}
        # Submitted events whose file is durable, waiting for the next batched delivery.
        self._outgoing: list[tuple[Path, str, M]] = []
        self._sending: asyncio.Handle | None = None
        self.delivered = 0
        self.commits = 0
        if depth_metric is not None:
            # Read at scrape time, on the metrics thread (a directory listing, off the event loop).
            metrics.SOURCES.gauge(*depth_metric, self.pending_count)

    # --- the request path ----------------------------------------------------------------

    async def record(self, tenant_id: str, event: M) -> bool:
        """Delivers the event and makes it durable here, both at once, and returns as soon as
        either is done (so the caller never goes on before the event is safe, and waits only
        for the faster of the two). False when Metering refused it or could not be reached:
        then it waits here for the background loop."""
        write = self._durable(tenant_id, event, telemetry.traceparent())
        send = asyncio.ensure_future(self._deliver(tenant_id, [event], False))
        self._track(self._settle([event_id(event)], [write], send))
        both: set[asyncio.Future[Any]] = {write, send}
        while True:
            done, _ = await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
            if send in done and send.exception() is None:
                return True
            if send in done or (write in done and write.exception() is not None):
                # Delivery failed (the write decides durability), or the write failed (only
                # delivery can make it safe): the caller must wait for the other one.
                await asyncio.wait(both)
                return send.exception() is None
            if write in done:
                return True  # durable here; delivery goes on in the background

    def submit(self, tenant_id: str, event: M) -> asyncio.Future[bool]:
        """Queues the event for the next group commit and returns at once; it is delivered
        (batched per tenant) as soon as it is on disk. The future resolves once the event is
        safe: True when it is on disk here (or, if the write failed, was delivered), False
        when it is neither (logged: it is lost). It never fails, and cancelling a wait for it
        (shielded) leaves the event's way unchanged."""
        write = self._durable(tenant_id, event, telemetry.traceparent())
        safe: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._track(self._after_write(tenant_id, event, write, safe))
        return safe

    async def _after_write(self, tenant_id: str, event: M, write: asyncio.Future[Path],
                           safe: asyncio.Future[bool]) -> None:
        try:
            path = await write
        except Exception as exc:
            log.error(f"{self._name}: write failed; delivering without a local copy",
                      extra={"event_id": event_id(event), "error": repr(exc)})
            delivered = await self._send_unwritten(tenant_id, event)
            if not safe.done():
                safe.set_result(delivered)
            return
        if not safe.done():
            safe.set_result(True)
        self._outgoing.append((path, tenant_id, event))
        if self._sending is None:
            # Every event of a commit resumes in the same loop turn: one delivery per tenant.
            self._sending = asyncio.get_running_loop().call_soon(self._send_outgoing)

    def _send_outgoing(self) -> None:
        self._sending = None
        outgoing, self._outgoing = self._outgoing, []
        by_tenant: dict[str, list[tuple[Path, M]]] = {}
        for path, tenant_id, event in outgoing:
            by_tenant.setdefault(tenant_id, []).append((path, event))
        for tenant_id, items in by_tenant.items():
            for start in range(0, len(items), self._batch):
                chunk = items[start:start + self._batch]
                self._track(self._deliver_written(tenant_id, chunk))

    async def _deliver_written(self, tenant_id: str, chunk: list[tuple[Path, M]]) -> None:
        send: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            await self._deliver(tenant_id, [e for _, e in chunk], False)
            send.set_result(None)
        except Exception as exc:
            send.set_exception(exc)
        await self._settle([event_id(e) for _, e in chunk], [_resolved(path) for path, _ in chunk], send)

    async def _send_unwritten(self, tenant_id: str, event: M) -> bool:
        try:
            await self._deliver(tenant_id, [event], False)
            self.delivered += 1
            return True
        except Exception as exc:
            log.error(f"{self._name}: event lost (neither written nor delivered)",
                      extra={"event_id": event_id(event), "error": repr(exc)})
            return False

    def _track(self, work: Awaitable[None]) -> None:
        future = asyncio.ensure_future(work)
        self._settling.add(future)
        future.add_done_callback(self._settling.discard)

    def _durable(self, tenant_id: str, event: M, parent: str | None) -> asyncio.Future[Path]:
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
                path = self._journal.path(group[0].tenant_id, event_id(group[0].event))
            else:
                path = self._journal.group_path()
            # In flight before the file exists: the background scan leaves it to us.
            self._inflight.add(path)
            self._groups[path] = _Group(outstanding=len(group))
            try:
                await asyncio.to_thread(self._journal.write_group, path, group)
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

    async def _settle(self, event_ids: list[str], writes: list[asyncio.Future[Path]],
                      send: asyncio.Future[None]) -> None:
        """Once delivery and the writes are done: count, wake the loop, release the files."""
        both: set[asyncio.Future[Any]] = {*writes, send}
        await asyncio.wait(both)
        send_error = send.exception()
        for write in writes:
            if write.exception() is not None:
                log.error(f"{self._name}: write failed", extra={"event_ids": event_ids[:10],
                                                                "error": repr(write.exception())})
        if send_error is not None:
            log.warning(f"{self._name}: kept for later delivery",
                        extra={"event_ids": event_ids[:10], "error": repr(send_error)})
            self._backlog = True
            self._wake.set()
        else:
            self.delivered += len(event_ids)
            if self._backlog:  # Metering is back: deliver what waited, now
                self._backlog = False
                self._wake.set()
        for write in writes:
            if write.exception() is None:
                await self._release(write.result(), delivered=send_error is None)

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
                await asyncio.to_thread(self._journal.remove, [path])
        finally:
            self._inflight.discard(path)

    # --- background delivery -------------------------------------------------------------

    def pending_count(self) -> int:
        """Files waiting here (a group commit's file holds several events)."""
        return self._journal.count()

    async def flush(self) -> int:
        """Delivers what is pending now; the number delivered."""
        pending = await asyncio.to_thread(self._journal.scan, self._inflight)
        by_tenant: dict[str, list[Pending[M]]] = {}
        for item in pending:
            by_tenant.setdefault(item.tenant_id, []).append(item)
        # A file goes once every event in it was delivered (a group's file may hold several
        # tenants' events).
        left = Counter(item.path for item in pending)
        done = 0
        for tenant_id, items in by_tenant.items():
            for start in range(0, len(items), self._batch):
                chunk = items[start:start + self._batch]
                # Its own trace (this runs in the background), linked to every request it covers.
                links = [link for p in chunk for link in telemetry.link_to(p.parent)]
                with telemetry.span(f"{self._name}.deliver", {
                        "tenant.id": tenant_id, "enduser.id": self._actor,
                        "copilot.outbox_events": len(chunk)}, links=links):
                    await self._deliver(tenant_id, [p.event for p in chunk], True)
                left.subtract(p.path for p in chunk)
                await asyncio.to_thread(self._journal.remove, sorted({p.path for p in chunk if left[p.path] <= 0}))
                done += len(chunk)
        self.delivered += done
        return done

    async def _loop(self) -> None:
        failures = 0
        while True:
            # Idle: every interval (jittered so replicas spread out); failing: backing off.
            delay = self._interval * random.uniform(0.8, 1.2) if failures == 0 else self._retry.delay(failures)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            self._wake.clear()
            try:
                started = time.monotonic()
                done = await self.flush()
                failures = 0
                if done:
                    log.info(f"{self._name}: delivered", extra={
                        "events": done, "ms": round((time.monotonic() - started) * 1000, 1)})
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                self._backlog = True
                log.warning(f"{self._name}: delivery failed; will retry", extra={"error": repr(exc)})

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=self._name)
            self._wake.set()  # replay what an earlier run left

    async def settled(self, timeout_s: float = 5.0) -> None:
        """Waits until every event handed in is either delivered or on disk (no work in flight)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._committer is not None and not self._committer.done():
                await asyncio.wait({self._committer}, timeout=max(0.0, deadline - time.monotonic()))
            if not self._settling:
                return
            await asyncio.wait(set(self._settling), timeout=max(0.0, deadline - time.monotonic()))

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
            log.warning(f"{self._name}: not empty at shutdown; delivered on next start",
                        extra={"pending": self.pending_count()})


def _resolved(path: Path) -> asyncio.Future[Path]:
    future: asyncio.Future[Path] = asyncio.get_running_loop().create_future()
    future.set_result(path)
    return future
