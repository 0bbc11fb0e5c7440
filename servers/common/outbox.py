"""A durable local outbox for any event type: events for Metering that must arrive once.

The generic form of servers/generation/outbox.py (the usage outbox, which should become
`Outbox[metering_pb2.UsageEvent]`): each event is written here (one small file per event,
fsync'd, directory fsync'd) while its first delivery is attempted; the file is removed once
Metering has acknowledged it. Whatever is left — Metering unreachable, the process killed
between the write and the acknowledgement — is delivered by a background loop, and again on
the next start, always with the same event id, which Metering deduplicates.

`record` returns at the faster of the delivery and the fsync. `submit` (audit events) queues
the event in memory and returns: after `linger_s` everything queued is written as one file
per tenant (one fsync) and delivered as one call, after the response that caused it has gone
out, so the request never waits — an event is lost only if the process dies within the
linger and the fsync.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

log = logging.getLogger("copilot.outbox")

MAX_BACKOFF_S = 5.0
# Submitted events per file and call.
MAX_SUBMIT_BATCH = 500


M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class Pending(Generic[M]):
    tenant_id: str
    event: M
    path: Path


# Sends a batch of one tenant's events (the flag: some may have been sent before); raises
# when they were not acknowledged.
Deliver = Callable[[str, list[Any], bool], Awaitable[None]]


def _safe_name(event_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in event_id)


class Outbox(Generic[M]):
    """Events of type `message` (each with an `event_id` field), delivered by `deliver`."""

    def __init__(self, directory: Path, deliver: Deliver, message: type[M], interval_s: float = 1.0,
                 batch: int = 100, name: str = "outbox", linger_s: float = 0.05) -> None:
        self._message = message
        self._name = name
        self._linger = linger_s
        self._queued: list[tuple[str, M]] = []
        self._drain: asyncio.TimerHandle | None = None
        self._submitted: set[asyncio.Task[bool]] = set()
        self._dir = directory
        # Created by the first write (on a worker thread): building a server touches no disk.
        self._deliver = deliver
        self._interval = interval_s
        self._batch = batch
        self._inflight: set[Path] = set()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._backlog = False
        self._settling: set[asyncio.Future[None]] = set()
        self.delivered = 0

    # --- files (blocking; run in a thread) ---------------------------------------------

    def _path(self, tenant_id: str, event_id: str) -> Path:
        return self._dir / f"{tenant_id}~{_safe_name(event_id)}.json"

    def _write(self, path: Path, tenant_id: str, events: list[M]) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"tenant_id": tenant_id,
                           "events": [json_format.MessageToDict(e) for e in events]}).encode()
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

    def _scan(self) -> list[Pending[M]]:
        pending: list[Pending[M]] = []
        for path in sorted(self._dir.glob("*.json")):
            if path in self._inflight:
                continue
            try:
                raw = json.loads(path.read_bytes())
                for body in raw["events"]:
                    pending.append(Pending(tenant_id=raw["tenant_id"], path=path,
                                           event=json_format.ParseDict(body, self._message())))
            except (OSError, ValueError, KeyError, json_format.ParseError):
                log.exception("unreadable outbox entry kept aside", extra={"path": str(path)})
                path.rename(path.with_suffix(".bad"))
        return pending

    # --- the answer path -----------------------------------------------------------------

    def submit(self, tenant_id: str, event: M) -> None:
        """Queues the event; the caller never waits, not even for the fsync (see the module
        docstring)."""
        self._queued.append((tenant_id, event))
        if self._drain is None:
            self._drain = asyncio.get_running_loop().call_later(self._linger, self._drain_queued)
        elif len(self._queued) >= MAX_SUBMIT_BATCH:
            self._drain.cancel()
            self._drain_queued()

    def _drain_queued(self) -> None:
        self._drain = None
        queued, self._queued = self._queued, []
        by_tenant: dict[str, list[M]] = {}
        for tenant_id, event in queued:
            by_tenant.setdefault(tenant_id, []).append(event)
        loop = asyncio.get_running_loop()
        for tenant_id, events in by_tenant.items():
            task = loop.create_task(self._record(tenant_id, events))
            self._submitted.add(task)
            task.add_done_callback(self._submitted.discard)

    async def record(self, tenant_id: str, event: M) -> bool:
        """Delivers the event and makes it durable here, both at once, and returns as soon as
        either is done (so the caller never goes on before the event is safe, and waits only
        for the faster of the two). False when Metering refused it or could not be reached:
        then it waits here for the background loop."""
        return await self._record(tenant_id, [event])

    async def _record(self, tenant_id: str, events: list[M]) -> bool:
        # Named by its first event's id (unique), so a batch never overwrites another file.
        event_id: str = getattr(events[0], "event_id")  # noqa: B009 - every outbox message has one
        path = self._path(tenant_id, event_id)
        self._inflight.add(path)
        write = asyncio.ensure_future(asyncio.to_thread(self._write, path, tenant_id, events))
        send = asyncio.ensure_future(self._deliver(tenant_id, events, False))
        settle = asyncio.ensure_future(self._settle(path, event_id, write, send))
        self._settling.add(settle)
        settle.add_done_callback(self._settling.discard)
        while True:
            done, _ = await asyncio.wait({write, send}, return_when=asyncio.FIRST_COMPLETED)
            if send in done and send.exception() is None:
                return True
            if send in done or (write in done and write.exception() is not None):
                # Delivery failed (the write decides durability), or the write failed (only
                # delivery can make it safe): the answer must wait for the other one.
                await asyncio.wait({write, send})
                return send.exception() is None
            if write in done:
                return True  # durable here; delivery goes on in the background

    async def _settle(self, path: Path, event_id: str, write: asyncio.Future[None], send: asyncio.Future[None]) -> None:
        try:
            await asyncio.wait({write, send})
            write_error, send_error = write.exception(), send.exception()
            if write_error is not None:
                log.error(f"{self._name}: write failed", extra={"event_id": event_id, "error": repr(write_error)})
            if send_error is not None:
                log.warning(f"{self._name}: kept for later delivery",
                            extra={"event_id": event_id, "error": repr(send_error)})
                self._backlog = True
                self._wake.set()
                return
            self.delivered += 1  # calls delivered (one per record, one per submitted batch)
            if write_error is None:
                await asyncio.to_thread(self._remove, [path])
            if self._backlog:  # Metering is back: deliver what waited, now
                self._backlog = False
                self._wake.set()
        finally:
            self._inflight.discard(path)

    # --- background delivery -------------------------------------------------------------

    def pending_count(self) -> int:
        return sum(1 for _ in self._dir.glob("*.json"))

    async def flush(self) -> int:
        """Delivers what is pending now; the number delivered."""
        pending = await asyncio.to_thread(self._scan)
        # Whole files per call: a file is removed only once all its events were delivered.
        by_tenant: dict[str, dict[Path, list[M]]] = {}
        for item in pending:
            by_tenant.setdefault(item.tenant_id, {}).setdefault(item.path, []).append(item.event)
        done = 0
        for tenant_id, files in by_tenant.items():
            paths: list[Path] = []
            events: list[M] = []
            for n, (path, file_events) in enumerate(files.items()):
                paths.append(path)
                events.extend(file_events)
                if len(events) >= self._batch or n == len(files) - 1:
                    await self._deliver(tenant_id, events, True)
                    await asyncio.to_thread(self._remove, paths)
                    done += len(events)
                    paths, events = [], []
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
            self._task = asyncio.create_task(self._loop(), name=self._name)
            self._wake.set()  # replay what an earlier run left

    async def settled(self, timeout_s: float = 5.0) -> None:
        """Waits until every recorded event is either delivered or on disk (no work in flight)."""
        if self._drain is not None:
            self._drain.cancel()
            self._drain_queued()
        if self._submitted:
            await asyncio.wait(set(self._submitted), timeout=timeout_s)
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
