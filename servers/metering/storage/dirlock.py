"""One process per embedded data directory: an exclusive lock, held while the store is open.

The audit trail's hash chain is assigned by one writer (servers/metering/audit/store.py); two
metering processes on the same chDB directory would each extend every tenant's chain from
their own idea of its head and fork it. chDB refuses a second process too, but only once
usage has opened it and with an error that names neither the directory nor the holder;
this lock comes first and says both. The kernel drops it when its holder dies (even by
SIGKILL), so a crash never leaves a stale lock behind.

Metering replicas never meet here: only the active one (servers/common/leadership.py) opens
the directory. This lock still guards it from anything else (a second mesh on the same data
directory, an offline tool) and is the same `FileLock` as the election's.
"""

from __future__ import annotations

import time
from pathlib import Path

from servers.common.leadership import FileLock

# Between two tries while waiting for the lock.
_RETRY_S = 0.05


class DataDirInUse(RuntimeError):
    pass


class DirLock:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # Beside the directory, not in it: the directory belongs to chDB.
        self._lock = FileLock(directory.with_name(f"{directory.name}.lock"))

    @property
    def path(self) -> Path:
        return self._lock.path

    def acquire(self, wait_s: float = 0.0) -> None:
        """Takes the lock (blocking I/O: call from a thread), trying for up to `wait_s`, or
        raises DataDirInUse."""
        deadline = time.monotonic() + wait_s
        while not self._lock.try_acquire():
            if time.monotonic() >= deadline:
                raise DataDirInUse(
                    f"data directory {self.directory} is in use by another process (pid {self._lock.holder()}; "
                    f"lock {self.path}): one metering process per directory, or each would extend the audit hash "
                    "chains on its own and fork them. Stop the other process or give this one its own "
                    "COPILOT_DATA_DIR.")
            time.sleep(_RETRY_S)

    def release(self) -> None:
        self._lock.release()
