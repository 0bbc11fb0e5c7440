"""Whose outbox is whose when a service runs as replicas, and outboxes no replica runs any more.

Each replica of a service keeps its outboxes in its own directory (`Settings.replica_dir`):
two processes replaying one journal would deliver, and delete, each other's events. While it
runs, a replica holds an exclusive lock on that directory (`replica.lock`, the same file lock
as metering's election: servers/common/leadership.py), so a second process given the same
replica index refuses to start instead of sharing the journal.

When `COPILOT_REPLICAS` is lowered, the directories of the replicas that no longer run keep
events nobody would deliver. Replica 0 adopts them at start: every journal file of an outbox
of `<service>-<i>` (i at or beyond the replica count, its lock free) is moved into replica
0's outbox of the same name, before that outbox replays. A move keeps the file, and so the
event ids: metering deduplicates anything that had been delivered before.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from servers.common.leadership import FileLock
from servers.common.settings import Settings

log = logging.getLogger("copilot.outbox")

LOCK_NAME = "replica.lock"


class ReplicaInUse(RuntimeError):
    pass


class ReplicaOutboxes:
    """This replica's claim on its outbox directory, and replica 0's adoption of orphans.
    `open` runs before the outboxes start; `close` after they stopped."""

    def __init__(self, settings: Settings, service: str, outboxes: Sequence[str]) -> None:
        self._settings = settings
        self._service = service
        self._outboxes = tuple(outboxes)
        self.directory = settings.replica_dir(service)
        self._lock = FileLock(self.directory / LOCK_NAME)

    async def open(self) -> None:
        moved = await asyncio.to_thread(self._open)
        if moved:
            log.warning("adopted the outboxes of replicas that no longer run",
                        extra={"service": self._service, "events_files": moved})

    def _open(self) -> int:
        if not self._lock.try_acquire():
            raise ReplicaInUse(
                f"{self.directory} is in use by another process (pid {self._lock.holder()}): one process per "
                f"replica index of {self._service}, or two would deliver and delete each other's outbox events")
        return self._adopt() if self._settings.replica == 0 else 0

    def _adopt(self) -> int:
        moved = 0
        prefix = f"{self._service}-"
        for candidate in sorted(self._settings.data_dir.glob(f"{prefix}*")):
            index = candidate.name[len(prefix):]
            if not candidate.is_dir() or not index.isdigit() or int(index) < self._settings.replicas:
                continue
            lock = FileLock(candidate / LOCK_NAME)
            if not lock.try_acquire():
                continue  # a process still runs it (not ours to take)
            try:
                for name in self._outboxes:
                    moved += _move_journal(candidate / name, self.directory / name)
            finally:
                lock.release()
        return moved

    async def close(self) -> None:
        await asyncio.to_thread(self._lock.release)


def _move_journal(source: Path, target: Path) -> int:
    """Moves every journal file (`*.json`) from `source` to `target`; an event file already
    there under the same name is the same event (files are named by tenant and event id)."""
    if not source.is_dir():
        return 0
    files = sorted(source.glob("*.json"))
    if not files:
        return 0
    target.mkdir(parents=True, exist_ok=True)
    for path in files:
        destination = target / path.name
        if destination.exists():
            path.unlink()
        else:
            os.rename(path, destination)
    for directory in (target, source):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return len(files)
