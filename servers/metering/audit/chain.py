"""The audit trail's hash chain: linking events into a per-tenant chain and verifying one.

Pure: no I/O. Each tenant's events get seq 1, 2, 3, ... and carry the hash of the previous
one; hash = sha256 over a canonical JSON of the stored fields plus prev_hash. Verification
walks stored rows in seq order and names the first break (an edit, a removal, a replacement,
an inserted duplicate, a fork), then checks the chain still reaches the head anchor and the
head the caller expects. How the chain is stored, and why, is in store.py.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from servers.metering.storage.sqlite import from_micros, to_micros

GENESIS = "0" * 64


@dataclass(frozen=True)
class NewEvent:
    """An event as a service reported it, before it joins its tenant's chain."""

    tenant_id: str
    event_id: str
    kind: str
    actor: str
    actor_roles: str
    service: str
    occur_time: datetime
    # Canonical JSON of the kind's details (the oneof of AuditEvent).
    details: str
    retention_days: int


@dataclass(frozen=True)
class AuditRow:
    """One stored event: exactly the fields the hash covers, plus the hash."""

    tenant_id: str
    seq: int
    event_id: str
    kind: str
    actor: str
    actor_roles: str
    service: str
    occur_us: int
    record_us: int
    details: str
    expire_us: int
    prev_expire_us: int
    prev_hash: str
    hash: str = ""

    def canonical(self) -> bytes:
        fields = [self.tenant_id, self.seq, self.event_id, self.kind, self.actor, self.actor_roles, self.service,
                  self.occur_us, self.record_us, self.details, self.expire_us, self.prev_expire_us, self.prev_hash]
        return json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()

    def computed_hash(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()

    def sealed(self) -> AuditRow:
        return replace(self, hash=self.computed_hash())

    def to_db(self) -> tuple[Any, ...]:
        return (self.tenant_id, self.seq, self.event_id, self.kind, self.actor, self.actor_roles, self.service,
                from_micros(self.occur_us), from_micros(self.record_us), self.details, from_micros(self.expire_us),
                self.prev_expire_us, self.prev_hash, self.hash)

    @classmethod
    def from_db(cls, row: Sequence[Any]) -> AuditRow:
        return cls(tenant_id=row[0], seq=int(row[1]), event_id=row[2], kind=row[3], actor=row[4],
                   actor_roles=row[5], service=row[6], occur_us=int(row[7]), record_us=int(row[8]),
                   details=row[9], expire_us=int(row[10]), prev_expire_us=int(row[11]), prev_hash=row[12],
                   hash=row[13])


@dataclass(frozen=True)
class Head:
    seq: int
    hash: str
    expire_us: int


EMPTY_HEAD = Head(0, GENESIS, 0)


def chain(head: Head, event: NewEvent, record_time: datetime) -> AuditRow:
    """The event as the next link after `head`."""
    record_us = to_micros(record_time)
    expire_us = max(to_micros(record_time + timedelta(days=event.retention_days)), head.expire_us)
    return AuditRow(tenant_id=event.tenant_id, seq=head.seq + 1, event_id=event.event_id, kind=event.kind,
                    actor=event.actor, actor_roles=event.actor_roles, service=event.service,
                    occur_us=to_micros(event.occur_time), record_us=record_us, details=event.details,
                    expire_us=expire_us, prev_expire_us=head.expire_us, prev_hash=head.hash).sealed()


# --- Verification ------------------------------------------------------------------------

HASH_MISMATCH = "hash_mismatch"
MISSING = "missing"
PREV_HASH_MISMATCH = "prev_hash_mismatch"
DUPLICATE = "duplicate"
FORK = "fork"
HEAD_MISMATCH = "head_mismatch"


@dataclass(frozen=True)
class ChainBreak:
    seq: int
    problem: str
    detail: str


@dataclass
class Verification:
    tenant_id: str
    checked: int = 0
    first_seq: int = 0
    last_seq: int = 0
    head_hash: str = ""
    first_break: ChainBreak | None = None
    # The head anchor compared with (None: the store had none).
    anchor: Head | None = None
    _prev: AuditRow | None = None
    # Hashes to remember while walking, by seq (the anchor's and the expected head's).
    watch: frozenset[int] = frozenset()
    _seen: dict[int, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.first_break is None

    def feed(self, rows: Sequence[AuditRow], now_us: int) -> None:
        """Checks the next rows (in seq order); stops at the first break."""
        for row in rows:
            if self.first_break is not None:
                return
            self.first_break = self._check(row, now_us)
            self.checked += 1
            if row.seq in self.watch:
                self._seen.setdefault(row.seq, row.hash)
            if self._prev is None:
                self.first_seq = row.seq
            self._prev = row
            self.last_seq = row.seq
            self.head_hash = row.hash

    def _check(self, row: AuditRow, now_us: int) -> ChainBreak | None:
        prev = self._prev
        if prev is None:
            if row.seq > 1 and row.prev_expire_us > now_us:
                return ChainBreak(row.seq - 1, MISSING, f"events before seq {row.seq} are gone although their "
                                  "retention has not ended: removed")
            if row.seq == 1 and row.prev_hash != GENESIS:
                return ChainBreak(row.seq, PREV_HASH_MISMATCH, "the first event does not start the chain")
        elif row.seq == prev.seq:
            if row.event_id != prev.event_id and row.prev_hash == prev.prev_hash \
                    and row.computed_hash() == row.hash and prev.computed_hash() == prev.hash:
                return ChainBreak(row.seq, FORK, f"two events claim seq {row.seq} ({prev.event_id} and "
                                  f"{row.event_id}), both linking to seq {row.seq - 1}: the chain forked — two "
                                  "writers appended to this tenant's trail at once (several metering instances "
                                  "on one ClickHouse)")
            return ChainBreak(row.seq, DUPLICATE, f"two events with seq {row.seq}: one was inserted")
        elif row.seq > prev.seq + 1:
            return ChainBreak(prev.seq + 1, MISSING, f"seq {prev.seq + 1} is missing (next present: {row.seq}): "
                              "removed")
        if row.computed_hash() != row.hash:
            return ChainBreak(row.seq, HASH_MISMATCH, f"seq {row.seq} does not match its hash: edited")
        if prev is not None and row.prev_hash != prev.hash:
            return ChainBreak(row.seq, PREV_HASH_MISMATCH,
                              f"seq {row.seq} does not link to seq {prev.seq}: replaced or reordered")
        return None

    def finish(self, anchor: Head | None, expected: Head | None, now_us: int) -> None:
        """Compares the chain walked with the head anchor and with the head the caller
        expects (an earlier verify's): each must still be in it, with its hash."""
        self.anchor = anchor
        if self.first_break is None and anchor is not None and anchor.expire_us > now_us:
            # (An anchor whose retention has ended: its events expired, as did all before them.)
            self.first_break = self._reaches(anchor, "the head anchor")
        if self.first_break is None and expected is not None:
            self.first_break = self._reaches(expected, "the expected head")

    def _reaches(self, head: Head, what: str) -> ChainBreak | None:
        if head.seq == 0:
            return None
        if head.seq > self.last_seq:
            gone = self.last_seq + 1
            events = f"event {gone} was" if gone == head.seq else f"events {gone}..{head.seq} were"
            return ChainBreak(gone, MISSING, f"the chain ends at seq {self.last_seq} but {what} records seq "
                              f"{head.seq}: {events} removed")
        if head.seq < self.first_seq:
            return None  # before the first event kept: expired (the walk checked that the prefix may go)
        found = self._seen.get(head.seq, "")
        if found != head.hash:
            return ChainBreak(head.seq, HEAD_MISMATCH, f"seq {head.seq} has hash {found[:16] or '-'}… but {what} "
                              f"records {head.hash[:16]}…: the chain was rewritten up to seq {head.seq}")
        return None
