"""The outbox's journal: its events on disk, durable before anyone relies on them.

Each write is one file (fsync'd, then its directory fsync'd), replaced atomically into
place. A lone event keeps its own file, named after its tenant and id; a group's file holds
several events (any tenants). Files are read back after a restart (`scan`) and removed once
every event in them has been delivered. Every method blocks: callers run them in a thread.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

log = logging.getLogger("copilot.outbox")

M = TypeVar("M", bound=Message)
M_co = TypeVar("M_co", bound=Message, covariant=True)


class Entry(Protocol[M_co]):
    """An event to write, with its tenant and the request's trace."""

    @property
    def tenant_id(self) -> str: ...

    @property
    def event(self) -> M_co: ...

    @property
    def parent(self) -> str | None: ...


@dataclass(frozen=True)
class Pending(Generic[M]):
    tenant_id: str
    event: M
    path: Path
    # The request's trace (W3C traceparent): a later delivery links back to it.
    parent: str | None = None


def _safe_name(event_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in event_id)


def event_id(event: Message) -> str:
    return str(getattr(event, "event_id"))  # noqa: B009 - every outbox message has one


class Journal(Generic[M]):
    """Events of type `message` as files under `directory` (created by the first write, on a
    worker thread: building a server touches no disk)."""

    def __init__(self, directory: Path, message: type[M]) -> None:
        self.directory = directory
        self._message = message

    def path(self, tenant_id: str, event_id: str) -> Path:
        """A lone event's file, named after its tenant and id."""
        return self.directory / f"{tenant_id}~{_safe_name(event_id)}.json"

    @staticmethod
    def _entry(tenant_id: str, event: M, parent: str | None) -> dict[str, object]:
        return {"tenant_id": tenant_id, "event": json_format.MessageToDict(event), "trace": parent}

    def group_path(self) -> Path:
        """A new file for several events (any tenants)."""
        return self.directory / f"group~{uuid.uuid4().hex}.json"

    def write_group(self, path: Path, writes: Sequence[Entry[M]]) -> None:
        """One file for the group: a lone event in the single-event format, several as a list."""
        if len(writes) == 1:
            w = writes[0]
            body = self._entry(w.tenant_id, w.event, w.parent)
        else:
            body = {"events": [self._entry(w.tenant_id, w.event, w.parent) for w in writes]}
        self._write_body(path, json.dumps(body).encode())

    def _write_body(self, path: Path, body: bytes) -> None:
        tmp = path.with_suffix(".tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileNotFoundError:
            # The first write (or the directory was removed): made here, not per write (a
            # mkdir that finds the directory costs a failed syscall and an exception each time).
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, flags, 0o600)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self._fsync_dir()

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove(self, paths: list[Path]) -> None:
        for path in paths:
            path.unlink(missing_ok=True)

    def scan(self, inflight: Collection[Path]) -> list[Pending[M]]:
        """Every event on disk except those in `inflight` files; an unreadable file is renamed
        to .bad and kept aside."""
        pending: list[Pending[M]] = []
        for path in sorted(self.directory.glob("*.json")):
            if path in inflight:
                continue
            try:
                raw = json.loads(path.read_bytes())
                entries = raw.get("events", [raw])
                pending.extend(Pending(tenant_id=e["tenant_id"], path=path, parent=e.get("trace"),
                                       event=json_format.ParseDict(e["event"], self._message()))
                               for e in entries)
            except (OSError, ValueError, KeyError, json_format.ParseError):
                log.exception("unreadable outbox entry kept aside", extra={"path": str(path)})
                path.rename(path.with_suffix(".bad"))
        return pending

    def count(self) -> int:
        """Files waiting here (a group commit's file holds several events)."""
        return sum(1 for _ in self.directory.glob("*.json"))
