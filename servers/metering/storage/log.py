"""The durable log between acknowledging usage and storing it in ClickHouse.

`RecordUsage` is acknowledged once its events are in this log (fsync'd to disk); a flusher
then moves them to ClickHouse in batches and commits the log up to what it stored. After
a crash, everything appended but not committed is read back and flushed again (ClickHouse
deduplicates a replay of what had been inserted but not yet committed).

`LocalLog` is the default: append-only segment files under the data directory, each
record framed with its length and CRC32 so a torn write at the tail (a crash mid-append,
never acknowledged) is detected and cut off on open.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from servers.common.errors import Unavailable
from servers.metering.storage.sqlite import from_micros, to_micros
from servers.metering.usage.domain import UsageEvent, UsageKind

log = logging.getLogger("copilot.metering.usagelog")

_HEADER = struct.Struct(">II")  # payload length, CRC32 of the payload
SEGMENT_BYTES = 64 * 1024 * 1024
CHECKPOINT = "checkpoint.json"


def event_dict(event: UsageEvent) -> dict[str, Any]:
    return {"t": event.tenant_id, "e": event.event_id, "k": event.kind.value, "m": event.model,
            "r": event.requests, "i": event.input_tokens, "o": event.output_tokens,
            "at": to_micros(event.occur_time), "a": dict(event.attributes)}


def event_from(raw: dict[str, Any]) -> UsageEvent:
    return UsageEvent(tenant_id=raw["t"], event_id=raw["e"], kind=UsageKind(raw["k"]), model=raw["m"],
                      requests=raw["r"], input_tokens=raw["i"], output_tokens=raw["o"],
                      occur_time=from_micros(raw["at"]), attributes=raw.get("a", {}))


def encode(events: Sequence[UsageEvent], record_time: datetime) -> bytes:
    return json.dumps({"rt": to_micros(record_time), "ev": [event_dict(e) for e in events]},
                      separators=(",", ":")).encode()


def decode(payload: bytes) -> tuple[datetime, list[UsageEvent]]:
    body = json.loads(payload)
    return from_micros(body["rt"]), [event_from(e) for e in body["ev"]]


@dataclass(frozen=True)
class LogCodec:
    """How a log's records are written and read back: usage events by default; the audit
    trail (servers/metering/audit/store.py) keeps its chained events in the same kind of log."""

    encode: Callable[[Sequence[Any], datetime], bytes]
    decode: Callable[[bytes], tuple[datetime, list[Any]]]


USAGE_CODEC = LogCodec(encode, decode)


@dataclass(frozen=True)
class LogEntry:
    """One appended batch. `position` orders entries and names them to `commit`."""

    position: Any
    record_time: datetime
    # UsageEvent for the usage log; whatever the log's codec reads back otherwise.
    events: list[Any]


class UsageLog(ABC):
    @abstractmethod
    async def open(self) -> list[LogEntry]:
        """Opens the log; returns the entries appended but not committed, oldest first."""

    @abstractmethod
    async def append(self, events: Sequence[Any], record_time: datetime) -> LogEntry:
        """Appends one batch; returns only once it is durable. On failure nothing of the
        batch is in the log."""

    @abstractmethod
    async def commit(self, entries: Sequence[LogEntry]) -> None:
        """Marks entries as stored downstream (a prefix of what is uncommitted)."""

    @abstractmethod
    async def close(self) -> None: ...

    async def ping(self) -> bool:
        return True


class LocalLog(UsageLog):
    """Segment files plus a checkpoint (segment, offset), all under one directory."""

    def __init__(self, directory: Path, segment_bytes: int = SEGMENT_BYTES, fsync: bool = True,
                 codec: LogCodec = USAGE_CODEC) -> None:
        self.directory = directory
        self._codec = codec
        self._segment_bytes = segment_bytes
        self._fsync = fsync
        self._executor: ThreadPoolExecutor | None = None
        # Touched only on the log's thread.
        self._fd: int | None = None
        self._segment = 0
        self._offset = 0
        self._broken: str | None = None

    # --- On the log's thread -----------------------------------------------------------

    def _path(self, segment: int) -> Path:
        return self.directory / f"{segment:012d}.log"

    def _segments(self) -> list[int]:
        return sorted(int(p.stem) for p in self.directory.glob("*.log") if p.stem.isdigit())

    def _read_checkpoint(self) -> tuple[int, int]:
        path = self.directory / CHECKPOINT
        if not path.exists():
            return 0, 0
        raw = json.loads(path.read_text())
        return int(raw["segment"]), int(raw["offset"])

    def _open(self) -> list[LogEntry]:
        self.directory.mkdir(parents=True, exist_ok=True)
        cp_segment, cp_offset = self._read_checkpoint()
        segments = self._segments()
        entries: list[LogEntry] = []
        for index, segment in enumerate(segments):
            last = index == len(segments) - 1
            if segment < cp_segment:
                self._path(segment).unlink(missing_ok=True)
                continue
            data = self._path(segment).read_bytes()
            offset = cp_offset if segment == cp_segment else 0
            good = 0
            pos = 0
            while pos + _HEADER.size <= len(data):
                length, crc = _HEADER.unpack_from(data, pos)
                end = pos + _HEADER.size + length
                if end > len(data) or zlib.crc32(data[pos + _HEADER.size:end]) != crc:
                    break
                if pos >= offset:
                    record_time, events = self._codec.decode(data[pos + _HEADER.size:end])
                    entries.append(LogEntry((segment, end), record_time, events))
                pos = good = end
            if good < len(data):
                if last:
                    # A torn append: it was never acknowledged.
                    log.warning("truncating a torn record at the end of the usage log",
                                extra={"segment": segment, "offset": good, "size": len(data)})
                    with open(self._path(segment), "r+b") as f:
                        f.truncate(good)
                        os.fsync(f.fileno())
                else:
                    log.error("corrupt record inside the usage log; the rest of the segment is skipped",
                              extra={"segment": segment, "offset": good})
        self._segment = segments[-1] if segments else max(cp_segment, 1)
        path = self._path(self._segment)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._offset = os.fstat(self._fd).st_size
        self._sync_dir()
        return entries

    def _sync_dir(self) -> None:
        if not self._fsync:
            return
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _append(self, payload: bytes) -> tuple[int, int]:
        if self._broken:
            raise OSError(self._broken)
        if self._fd is None:
            raise OSError("the usage log is not open")
        if self._offset >= self._segment_bytes:
            os.close(self._fd)
            self._segment += 1
            self._fd = os.open(self._path(self._segment), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._offset = 0
            self._sync_dir()
        record = _HEADER.pack(len(payload), zlib.crc32(payload)) + payload
        before = self._offset
        try:
            written = os.write(self._fd, record)
            if written != len(record):
                raise OSError(f"short write to the usage log ({written} of {len(record)} bytes)")
            if self._fsync:
                os.fdatasync(self._fd)
        except OSError:
            # Cut the partial record off, or later appends would sit behind a torn one.
            try:
                os.ftruncate(self._fd, before)
                os.fsync(self._fd)
            except OSError as exc:
                self._broken = f"the usage log could not be repaired after a failed write: {exc!r}"
            raise
        self._offset = before + len(record)
        return self._segment, self._offset

    def _checkpoint(self, segment: int, offset: int) -> None:
        path = self.directory / CHECKPOINT
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump({"segment": segment, "offset": offset}, f)
            f.flush()
            if self._fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        self._sync_dir()
        for older in self._segments():
            if older < segment:
                self._path(older).unlink(missing_ok=True)

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    # --- From the event loop -----------------------------------------------------------

    async def _call(self, fn: Any, *args: Any) -> Any:
        if self._executor is None:
            raise Unavailable("the usage log is not open", reason="STORE_CLOSED")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def open(self) -> list[LogEntry]:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usage-log")
        entries: list[LogEntry] = await self._call(self._open)
        return entries

    async def append(self, events: Sequence[Any], record_time: datetime) -> LogEntry:
        payload = self._codec.encode(events, record_time)
        try:
            position = await self._call(self._append, payload)
        except OSError as exc:
            log.warning("usage log append failed", extra={"error": repr(exc)})
            raise Unavailable("usage could not be made durable; retry", reason="LOG_FAILED") from exc
        return LogEntry(position, record_time, list(events))

    async def commit(self, entries: Sequence[LogEntry]) -> None:
        if entries:
            segment, offset = max(e.position for e in entries)
            await self._call(self._checkpoint, segment, offset)

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.get_running_loop().run_in_executor(executor, self._close)
            executor.shutdown(wait=False)

    async def ping(self) -> bool:
        return self._executor is not None and self._broken is None


def now_utc() -> datetime:
    return datetime.now(UTC)


class RedisStreamLog(UsageLog):
    """The log as a Redis Stream (REDIS_URL) with a consumer group.

    An append is one XADD (acknowledged once Redis has it; run Redis with
    `appendfsync always` for it to be on disk). On open, entries nobody took (">") and
    entries delivered but never acknowledged (this consumer's pending list, and other
    consumers' after `claim_idle_ms` through XAUTOCLAIM) are read back and flushed again.
    A commit acknowledges (XACK) and deletes (XDEL) the flushed entries.

    The metering server opens it only in the active replica, which holds the leadership lock
    (servers/common/leadership.py): no other consumer can be flushing, so it passes
    `claim_idle_ms=0` and takes over a dead active's entries at once.
    """

    def __init__(self, url: str, stream: str = "copilot:usage:log", group: str = "flushers",
                 consumer: str | None = None, claim_idle_ms: int = 60_000, codec: LogCodec = USAGE_CODEC) -> None:
        import socket

        self._codec = codec
        self.url = url
        self.stream = stream
        self.group = group
        self.consumer = consumer or f"metering-{socket.gethostname()}"
        self._claim_idle_ms = claim_idle_ms
        self._redis: Any = None

    async def open(self) -> list[LogEntry]:
        import redis.asyncio as aredis
        from redis.exceptions import ResponseError

        self._redis = aredis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5)
        try:
            await self._redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        entries: dict[bytes, LogEntry] = {}
        # Never delivered: take them all into this consumer's pending list.
        while True:
            got = await self._redis.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=1000)
            if not got or not got[0][1]:
                break
        # Everything this consumer has pending (just taken, or left by its crashed self).
        start = "0"
        while True:
            got = await self._redis.xreadgroup(self.group, self.consumer, {self.stream: start}, count=1000)
            items = got[0][1] if got else []
            if not items:
                break
            for entry_id, fields in items:
                if fields:
                    entries[entry_id] = self._entry(entry_id, fields)
            start = items[-1][0]
        # Other consumers' entries left pending for too long (a crashed instance).
        cursor: Any = "0-0"
        while True:
            reply = await self._redis.xautoclaim(self.stream, self.group, self.consumer,
                                                 min_idle_time=self._claim_idle_ms, start_id=cursor, count=1000)
            cursor, claimed = reply[0], reply[1]
            for entry_id, fields in claimed:
                if fields:
                    entries[entry_id] = self._entry(entry_id, fields)
            if cursor in (b"0-0", "0-0"):
                break
        return [entries[k] for k in sorted(entries, key=_stream_order)]

    def _entry(self, entry_id: bytes, fields: dict[bytes, bytes]) -> LogEntry:
        record_time, events = self._codec.decode(fields[b"b"])
        return LogEntry(entry_id, record_time, events)

    async def append(self, events: Sequence[Any], record_time: datetime) -> LogEntry:
        from redis.exceptions import RedisError

        try:
            entry_id = await self._redis.xadd(self.stream, {"b": self._codec.encode(events, record_time)})
        except (RedisError, OSError) as exc:
            log.warning("usage log append failed", extra={"error": repr(exc)})
            raise Unavailable("usage could not be made durable (Redis); retry", reason="LOG_FAILED") from exc
        return LogEntry(entry_id, record_time, list(events))

    async def commit(self, entries: Sequence[LogEntry]) -> None:
        if not entries:
            return
        ids = [e.position for e in entries]
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, self.group, *ids)
            pipe.xdel(self.stream, *ids)
            await pipe.execute()

    async def close(self) -> None:
        client, self._redis = self._redis, None
        if client is not None:
            await client.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except Exception:
            return False


def _stream_order(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.decode().partition("-")
    return int(ms), int(seq or 0)
