"""A durable local outbox for usage events: no answer unbilled, none billed twice.

Every answer's usage event is written here (one small file per event, fsync'd, directory
fsync'd) while its first delivery to Metering is attempted; the file is removed once
Metering has acknowledged it. Whatever is left — Metering unreachable, the process killed
between the answer and the acknowledgement — is delivered by a background loop, and again
on the next start, always with the same event id, which Metering deduplicates.
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

from google.protobuf import json_format

from copilot.v1 import metering_pb2

log = logging.getLogger("copilot.generation.outbox")

MAX_BACKOFF_S = 5.0


@dataclass(frozen=True)
class Pending:
    tenant_id: str
    event: metering_pb2.UsageEvent
    path: Path


# Sends a batch of one tenant's events; raises when they were not acknowledged.
Deliver = Callable[[str, list[metering_pb2.UsageEvent]], Awaitable[None]]


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
        self.delivered = 0

    # --- files (blocking; run in a thread) ---------------------------------------------

    def _path(self, tenant_id: str, event_id: str) -> Path:
        return self._dir / f"{tenant_id}~{_safe_name(event_id)}.json"

    def _write(self, path: Path, tenant_id: str, event: metering_pb2.UsageEvent) -> None:
        body = json.dumps({"tenant_id": tenant_id, "event": json_format.MessageToDict(event)}).encode()
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
                event = json_format.ParseDict(raw["event"], metering_pb2.UsageEvent())
                pending.append(Pending(tenant_id=raw["tenant_id"], event=event, path=path))
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
        path = self._path(tenant_id, event.event_id)
        self._inflight.add(path)
        write = asyncio.ensure_future(asyncio.to_thread(self._write, path, tenant_id, event))
        send = asyncio.ensure_future(self._deliver(tenant_id, [event]))
        settle = asyncio.ensure_future(self._settle(path, event.event_id, write, send))
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
                log.error("usage outbox write failed", extra={"event_id": event_id, "error": repr(write_error)})
            if send_error is not None:
                log.warning("usage kept in the outbox for later delivery",
                            extra={"event_id": event_id, "error": repr(send_error)})
                self._backlog = True
                self._wake.set()
                return
            self.delivered += 1
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
        by_tenant: dict[str, list[Pending]] = {}
        for item in pending:
            by_tenant.setdefault(item.tenant_id, []).append(item)
        done = 0
        for tenant_id, items in by_tenant.items():
            for start in range(0, len(items), self._batch):
                chunk = items[start:start + self._batch]
                await self._deliver(tenant_id, [p.event for p in chunk])
                await asyncio.to_thread(self._remove, [p.path for p in chunk])
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
