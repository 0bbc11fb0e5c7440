"""One active process among several on the same data directory: an exclusive `flock`.

`FileLock` is the primitive: a non-blocking exclusive flock on a file, the holder's pid
written in it for the others' messages. The kernel drops the lock when its holder dies,
even by SIGKILL, and no live holder can lose it: a fence, not a lease (nothing expires
while the holder is merely slow). Only processes sharing the file's filesystem see it, so
it elects one active per data directory (per host); replicas on several hosts would need a
distributed lease instead.

`Leadership` is the election a server awaits (servers/common/lifecycle.py, `Service.leadership`):
it polls the lock off the event loop until it has it. Until then the process is a standby.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from servers.common.errors import Unavailable
from servers.common.interceptors import PUBLIC_PREFIXES, Context, Handler, ServerInterceptor, handler_like

log = logging.getLogger("copilot.leadership")


class FileLock:
    """An exclusive flock on `path`. Every method does blocking file I/O: call from a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Takes the lock if it is free; False at once if another process holds it."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return True

    def holder(self) -> str:
        """The pid the current holder wrote ("unknown" before it wrote it, or if none holds it)."""
        try:
            return self.path.read_text(errors="replace").strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            # Closing drops the lock; the pid left in the file is only read while someone holds it.
            os.close(fd)


class Leadership:
    """The election of the one active process: whoever holds the lock file."""

    def __init__(self, path: Path, poll_interval_s: float) -> None:
        self.lock = FileLock(path)
        self._poll_interval = poll_interval_s

    async def acquire(self) -> None:
        """Returns once this process holds the lock, polling it every `poll_interval_s` off the
        event loop. Cancelled (a standby told to stop), it leaves the lock untaken."""
        waiting_on: str | None = None
        while True:
            # Shielded: a cancel must not abandon a thread that may still take the lock.
            attempt = asyncio.ensure_future(asyncio.to_thread(self.lock.try_acquire))
            try:
                got = await asyncio.shield(attempt)
            except asyncio.CancelledError:
                if await attempt:
                    await asyncio.to_thread(self.lock.release)
                raise
            if got:
                return
            holder = await asyncio.to_thread(self.lock.holder)
            if holder != waiting_on:
                log.info(f"standby: waiting for the lock held by pid {holder}", extra={"lock": str(self.lock.path)})
                waiting_on = holder
            await asyncio.sleep(self._poll_interval)

    async def release(self) -> None:
        await asyncio.to_thread(self.lock.release)


class StandbyGuard(ServerInterceptor):
    """Refuses every call but health probes and reflection with UNAVAILABLE until `activate()`:
    a standby (or a replica still opening its stores after winning the election) serves
    nothing, and says so in a way Envoy's retry policy and gRPC clients move on from."""

    def __init__(self, service: str) -> None:
        self._service = service
        self._active = False
        self._reason = "STANDBY"
        self._message = f"{service}: this replica is a standby (another one is active); retry"

    def starting(self) -> None:
        self._reason = "STARTING"
        self._message = f"{self._service}: this replica was elected and is still opening its stores; retry"

    def activate(self) -> None:
        self._active = True

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        if self._active or handler is None or details.method.startswith(PUBLIC_PREFIXES):
            return handler
        status = Unavailable(self._message, reason=self._reason).to_status()

        async def refuse(request: Any, context: Context) -> None:
            await context.abort(status.code, status.details, trailing_metadata=tuple(status.trailing_metadata))

        # No request deserializer: a refused request is never read.
        return handler_like(handler, refuse, None)
