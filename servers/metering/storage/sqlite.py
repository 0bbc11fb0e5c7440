"""A SQLite connection owned by one dedicated thread, driven from asyncio.

sqlite3 calls block, so they never run on the event loop; and a connection is only safe
from the thread that made it, so each store gets a single-thread executor that opens,
uses and closes its connection. One writer thread per database also serialises that
store's transactions in this process without any lock.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

from servers.common.errors import Unavailable

T = TypeVar("T")

log = logging.getLogger("copilot.metering.sqlite")


class SqliteWorker:
    def __init__(self, path: Path, name: str, schema: Sequence[str], synchronous: str = "FULL") -> None:
        self.path = path
        self._name = name
        self._schema = tuple(schema)
        self._synchronous = synchronous
        self._executor: ThreadPoolExecutor | None = None
        # Touched only from the executor's thread.
        self._conn: sqlite3.Connection | None = None

    async def start(self) -> None:
        if self._executor is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite-{self._name}")
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._open)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    def _open(self) -> None:
        # Autocommit mode: every transaction is an explicit BEGIN … COMMIT in store code,
        # so nothing is committed (or left open) behind our back.
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("BEGIN IMMEDIATE")
            for statement in self._schema:
                conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Runs `fn(connection)` on the store's thread. Domain errors raised by `fn` pass
        through; database failures become UNAVAILABLE so callers retry."""
        executor = self._executor
        if executor is None:
            raise Unavailable(f"the {self._name} store is not open", reason="STORE_CLOSED")
        try:
            pending = asyncio.get_running_loop().run_in_executor(executor, self._run, fn)
        except RuntimeError as exc:  # shut down between the check above and the submit
            raise Unavailable(f"the {self._name} store is closed", reason="STORE_CLOSED") from exc
        try:
            return await pending
        except sqlite3.Error as exc:
            log.warning("sqlite error", extra={"store": self._name, "error": repr(exc)})
            raise Unavailable(f"the {self._name} store failed; retry later", reason="STORE_FAILED") from exc

    def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            raise Unavailable(f"the {self._name} store is not open", reason="STORE_CLOSED")
        return fn(self._conn)

    async def ping(self) -> bool:
        def probe(conn: sqlite3.Connection) -> bool:
            return bool(conn.execute("SELECT 1").fetchone() == (1,))

        try:
            return await self.call(probe)
        except Unavailable:
            return False

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        await asyncio.get_running_loop().run_in_executor(executor, self._close)
        executor.shutdown(wait=False)

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def transaction(conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], T]) -> T:
    """Runs `body` in one write transaction: committed whole or rolled back whole."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = body(conn)
        conn.execute("COMMIT")
    except BaseException:
        # A failed COMMIT can leave the transaction open; never let a later one commit it.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_micros(moment: datetime) -> int:
    """Microseconds since the Unix epoch (UTC): exact, and ordered like the instants."""
    delta = moment.astimezone(UTC) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


class SqliteStore:
    """Lifecycle shared by the stores kept in one SQLite database each."""

    _db: SqliteWorker

    @property
    def path(self) -> Path:
        return self._db.path

    async def open(self) -> None:
        await self._db.start()

    async def close(self) -> None:
        await self._db.close()

    async def ping(self) -> bool:
        return await self._db.ping()
