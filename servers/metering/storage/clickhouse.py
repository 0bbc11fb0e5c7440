"""Usage in ClickHouse: one schema and one set of queries, two ways to run them.

`ChdbBackend` runs them in-process with chDB on a data directory (the embedded default);
`ServerBackend` runs them on a ClickHouse server through clickhouse-connect
(`CLICKHOUSE_URL`). Both are blocking libraries, so every call runs on one dedicated
thread per backend, never on the event loop; one thread also keeps chDB's session (which
is not meant for concurrent use) on the thread that made it.

Deduplication: `usage_events` is a ReplacingMergeTree keyed by (tenant_id, event_id), so
an event replayed from the durable log (a crash between the insert and the log's
checkpoint) is collapsed by merges; until then every query reads with FINAL, so nothing
is ever counted twice. Partitions are months of occur_time: an event's occur_time is fixed
when it is acknowledged, so its replays land in the same partition and collapse there.
"""

from __future__ import annotations

import asyncio
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from servers.common.errors import Unavailable
from servers.metering.storage.dirlock import DirLock

log = logging.getLogger("copilot.metering.clickhouse")

T = TypeVar("T")

DATABASE = "copilot"
TABLE = f"{DATABASE}.usage_events"

COLUMNS = ("tenant_id", "event_id", "kind", "model", "requests", "input_tokens", "output_tokens",
           "occur_time", "record_time", "attributes")

SCHEMA = (
    f"CREATE DATABASE IF NOT EXISTS {DATABASE}",
    f"""CREATE TABLE IF NOT EXISTS {TABLE} (
        tenant_id String,
        event_id String,
        kind LowCardinality(String),
        model LowCardinality(String),
        requests Int64,
        input_tokens Int64,
        output_tokens Int64,
        occur_time DateTime64(6, 'UTC'),
        record_time DateTime64(6, 'UTC'),
        attributes Map(String, String)
    ) ENGINE = ReplacingMergeTree
    PARTITION BY toYYYYMM(occur_time)
    ORDER BY (tenant_id, event_id)
    SETTINGS fsync_after_insert = 1, fsync_part_directory = 1""",
)

# --- The queries (server-side parameters: the same text runs on chDB and on a server) ---

TOTALS_SQL = (
    f"SELECT model, sum(requests), sum(input_tokens), sum(output_tokens), count() "
    f"FROM {TABLE} FINAL WHERE tenant_id = {{tenant:String}} "
    f"AND occur_time >= {{start:DateTime64(6, 'UTC')}} AND occur_time < {{end:DateTime64(6, 'UTC')}} "
    f"GROUP BY model ORDER BY model")

HOURLY_SQL = (
    f"SELECT toUnixTimestamp(toStartOfHour(occur_time)), sum(requests), sum(input_tokens + output_tokens) "
    f"FROM {TABLE} FINAL WHERE tenant_id = {{tenant:String}} "
    f"AND occur_time >= {{start:DateTime64(6, 'UTC')}} AND occur_time < {{end:DateTime64(6, 'UTC')}} "
    f"GROUP BY 1")

# Primary-key lookup of which ids of a batch are already stored (no FINAL needed: any row
# with the key means the id is claimed).
EXISTING_SQL = (f"SELECT DISTINCT event_id FROM {TABLE} "
                f"WHERE tenant_id = {{tenant:String}} AND event_id IN {{ids:Array(String)}}")

# Per tenant and interval, for billing and reconciliation.
INTERVAL_SQL = (
    f"SELECT tenant_id, sum(requests), sum(input_tokens + output_tokens) FROM {TABLE} FINAL "
    f"WHERE occur_time >= {{start:DateTime64(6, 'UTC')}} AND occur_time < {{end:DateTime64(6, 'UTC')}} "
    f"GROUP BY tenant_id ORDER BY tenant_id")

# Per tenant and hour, for Billing Meter Events.
HOURLY_BY_TENANT_SQL = (
    f"SELECT tenant_id, toUnixTimestamp(toStartOfHour(occur_time)) AS hour, sum(requests), "
    f"sum(input_tokens + output_tokens) FROM {TABLE} FINAL "
    f"WHERE occur_time >= {{start:DateTime64(6, 'UTC')}} AND occur_time < {{end:DateTime64(6, 'UTC')}} "
    f"GROUP BY tenant_id, hour ORDER BY tenant_id, hour")

COUNT_SQL = f"SELECT count() FROM {TABLE} FINAL WHERE tenant_id = {{tenant:String}}"

DELETE_TENANT_SQL = f"DELETE FROM {TABLE} WHERE tenant_id = {{tenant:String}}"

# tenant_id is part of the sorting key, which ClickHouse cannot update in place: the rows
# are copied under the anonymous id (without attributes), then the originals deleted.
ANONYMISE_SQL = (
    f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) "
    f"SELECT {{anonymous:String}}, event_id, kind, model, requests, input_tokens, output_tokens, occur_time, "
    f"record_time, map() FROM {TABLE} FINAL WHERE tenant_id = {{tenant:String}}")


def _ch_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def param_text(value: Any) -> str:
    """A query parameter in ClickHouse's text form (how chDB takes them)."""
    if isinstance(value, datetime):
        return _ch_time(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_quote(v) if isinstance(v, str) else param_text(v) for v in value) + "]"
    return str(value)


class ClickHouseBackend(ABC):
    """Runs ClickHouse SQL; every method is blocking work moved off the event loop."""

    name = "clickhouse"

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None

    async def open(self) -> None:
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ch-{self.name}")
        try:
            await self._call(self._connect)
            for statement in SCHEMA:
                await self._call(self._command, statement, {})
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        await asyncio.get_running_loop().run_in_executor(executor, self._disconnect)
        executor.shutdown(wait=False)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        executor = self._executor
        if executor is None:
            raise Unavailable("the usage database is not open", reason="STORE_CLOSED")
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        except Unavailable:
            raise
        except Exception as exc:
            log.warning("clickhouse error", extra={"backend": self.name, "error": repr(exc)[:500]})
            raise Unavailable("the usage database failed; retry later", reason="STORE_FAILED") from exc

    async def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[list[Any]]:
        return await self._call(self._query, sql, dict(params or {}))

    async def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        await self._call(self._command, sql, dict(params or {}))

    async def insert(self, rows: Sequence[Sequence[Any]], table: str = TABLE,
                     columns: Sequence[str] = COLUMNS) -> None:
        """Inserts rows (in `columns` order; usage_events by default) as one insert."""
        if rows:
            await self._call(self._insert, rows, table, tuple(columns))

    async def ping(self) -> bool:
        try:
            return (await self.query("SELECT 1")) == [[1]]
        except Unavailable:
            return False

    @abstractmethod
    def _connect(self) -> None: ...

    @abstractmethod
    def _disconnect(self) -> None: ...

    @abstractmethod
    def _query(self, sql: str, params: dict[str, Any]) -> list[list[Any]]: ...

    @abstractmethod
    def _command(self, sql: str, params: dict[str, Any]) -> None: ...

    @abstractmethod
    def _insert(self, rows: Sequence[Sequence[Any]], table: str, columns: tuple[str, ...]) -> None: ...


class ChdbBackend(ClickHouseBackend):
    """ClickHouse in-process (chDB), on a data directory so usage survives restarts.
    chDB allows one data directory per process."""

    name = "chdb"

    def __init__(self, path: Path, lock_wait_s: float = 0.0) -> None:
        """`lock_wait_s`: how long `open` waits for the directory's lock (0: fails at once)."""
        super().__init__()
        self.path = path
        self._session: Any = None
        # One process per directory (the audit chain's single writer): fails fast, naming the holder.
        self._lock = DirLock(path)
        self._lock_wait_s = lock_wait_s

    async def open(self) -> None:
        if self._executor is None:
            await asyncio.to_thread(self._lock.acquire, self._lock_wait_s)
        await super().open()

    async def close(self) -> None:
        await super().close()
        self._lock.release()

    def _connect(self) -> None:
        from chdb import session

        self.path.mkdir(parents=True, exist_ok=True)
        self._session = session.Session(str(self.path))

    def _disconnect(self) -> None:
        sess, self._session = self._session, None
        if sess is not None:
            sess.close()

    def _run(self, sql: str, params: dict[str, Any], fmt: str) -> Any:
        if self._session is None:
            raise Unavailable("the usage database is not open", reason="STORE_CLOSED")
        text = {k: param_text(v) for k, v in params.items()}
        return self._session.query(sql, fmt, params=text or None)

    def _query(self, sql: str, params: dict[str, Any]) -> list[list[Any]]:
        raw = self._run(sql, params, "JSONCompact").bytes()
        if not raw:
            return []
        data: list[list[Any]] = json.loads(raw)["data"]
        return data

    def _command(self, sql: str, params: dict[str, Any]) -> None:
        self._run(sql, params, "CSV")

    def _insert(self, rows: Sequence[Sequence[Any]], table: str, columns: tuple[str, ...]) -> None:
        lines = []
        for row in rows:
            record = {name: _ch_time(value) if isinstance(value, datetime) else value
                      for name, value in zip(columns, row, strict=True)}
            lines.append(json.dumps(record, separators=(",", ":")))
        self._run(f"INSERT INTO {table} FORMAT JSONEachRow\n" + "\n".join(lines), {}, "CSV")


class ServerBackend(ClickHouseBackend):
    """A ClickHouse server through clickhouse-connect (HTTP), e.g.
    CLICKHOUSE_URL=http://default:@127.0.0.1:8123."""

    name = "clickhouse-server"

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self._client: Any = None

    def _connect(self) -> None:
        import clickhouse_connect

        parsed = urlparse(self.url)
        self._client = clickhouse_connect.get_client(
            host=parsed.hostname or "127.0.0.1", port=parsed.port or 8123,
            username=parsed.username or "default", password=parsed.password or "",
            secure=parsed.scheme == "https")

    def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def _query(self, sql: str, params: dict[str, Any]) -> list[list[Any]]:
        result = self._client.query(sql, parameters=params)
        return [list(row) for row in result.result_rows]

    def _command(self, sql: str, params: dict[str, Any]) -> None:
        self._client.command(sql, parameters=params)

    def _insert(self, rows: Sequence[Sequence[Any]], table: str, columns: tuple[str, ...]) -> None:
        self._client.insert(table, [list(r) for r in rows], column_names=list(columns))


def backend(clickhouse_url: str | None, embedded_dir: Path, lock_wait_s: float = 0.0) -> ClickHouseBackend:
    return ServerBackend(clickhouse_url) if clickhouse_url else ChdbBackend(embedded_dir, lock_wait_s)
