"""One process per embedded data directory: an exclusive lock, held while the store is open.

The audit trail's hash chain is assigned by one writer (servers/metering/audit/store.py); two
metering processes on the same chDB directory would each extend every tenant's chain from
their own idea of its head and fork it. chDB refuses a second process too, but only once
usage has opened it and with an error that names neither the directory nor the holder;
this lock comes first and says both. The kernel drops it when its holder dies (even by
SIGKILL), so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class DataDirInUse(RuntimeError):
    pass


class DirLock:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # Beside the directory, not in it: the directory belongs to chDB.
        self.path = directory.with_name(f"{directory.name}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock (blocking I/O: call from a thread) or raises DataDirInUse at once."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUse(
                f"data directory {self.directory} is in use by another process (pid {holder}; lock {self.path}): "
                "one metering process per directory, or each would extend the audit hash chains on its own "
                "and fork them. Stop the other process or give this one its own COPILOT_DATA_DIR.") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            # Closing drops the lock; the pid left in the file is only read while someone holds it.
            os.close(fd)
