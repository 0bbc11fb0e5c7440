"""The election of the active metering replica (servers/common/leadership.py), between real
processes: a child holds the lock, this process waits as a standby and takes over when the
child is killed with SIGKILL; a cancelled standby leaves the lock free; the chDB directory
lock is the same lock."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from servers.common.leadership import FileLock, Leadership
from servers.metering.storage.dirlock import DataDirInUse, DirLock

ROOT = Path(__file__).resolve().parents[2]

# Takes the lock, says so, then holds it until killed.
HOLDER = """
import sys, time
from pathlib import Path
from servers.common.leadership import FileLock
lock = FileLock(Path(sys.argv[1]))
deadline = time.monotonic() + 30
while not lock.try_acquire():
    assert time.monotonic() < deadline, "the holder never got the lock"
    time.sleep(0.02)
print("held", flush=True)
time.sleep(120)
"""


class Holder:
    """Another process holding `path`'s lock."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], cwd=ROOT, stdout=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == b"held"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[Holder]:
    held = Holder(tmp_path / "active.lock")
    try:
        yield held
    finally:
        held.kill9()


async def test_a_standby_waits_while_the_holder_lives_and_takes_over_when_it_is_killed(
        tmp_path: Path, holder: Holder, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="copilot.leadership")
    standby = Leadership(tmp_path / "active.lock", poll_interval_s=0.05)
    election = asyncio.ensure_future(standby.acquire())
    await asyncio.sleep(0.5)
    assert not election.done()
    assert not standby.lock.held
    assert f"standby: waiting for the lock held by pid {holder.pid}" in caplog.messages

    killed = time.monotonic()
    await asyncio.to_thread(holder.kill9)
    await asyncio.wait_for(election, timeout=5)
    print(f"took over {time.monotonic() - killed:.3f} s after the kill")
    assert standby.lock.held
    assert standby.lock.holder() == str(os.getpid())

    # Now this process is the one a third must wait for.
    third = FileLock(tmp_path / "active.lock")
    assert not await asyncio.to_thread(third.try_acquire)
    await standby.release()
    assert await asyncio.to_thread(third.try_acquire)
    await asyncio.to_thread(third.release)


async def test_a_cancelled_standby_leaves_the_lock_to_others(tmp_path: Path, holder: Holder) -> None:
    standby = Leadership(tmp_path / "active.lock", poll_interval_s=0.05)
    election = asyncio.ensure_future(standby.acquire())
    await asyncio.sleep(0.2)
    election.cancel()
    with pytest.raises(asyncio.CancelledError):
        await election
    await asyncio.to_thread(holder.kill9)
    # A cancelled standby never takes the lock afterwards: another process gets it.
    await asyncio.sleep(0.2)
    assert not standby.lock.held
    Holder(tmp_path / "active.lock").kill9()


async def test_the_first_process_is_elected_at_once(tmp_path: Path) -> None:
    alone = Leadership(tmp_path / "metering" / "active.lock", poll_interval_s=10)
    await asyncio.wait_for(alone.acquire(), timeout=2)
    assert alone.lock.held
    await alone.release()
    assert not alone.lock.held


def test_the_chdb_directory_lock_names_the_holder_and_waits_for_a_dying_one(tmp_path: Path) -> None:
    directory = tmp_path / "chdb"
    holder = Holder(directory.with_name("chdb.lock"))
    try:
        with pytest.raises(DataDirInUse) as refused:
            DirLock(directory).acquire()
        assert f"pid {holder.pid}" in str(refused.value)

        # A holder that dies within the wait leaves the lock to the waiter.
        waiter = DirLock(directory)
        killer = threading.Timer(0.3, holder.kill9)
        killer.start()
        waiter.acquire(wait_s=10)
        killer.join()
        waiter.release()
    finally:
        holder.kill9()
