"""The audit trail's storage: a per-tenant hash chain (chain.py), durable log first, then ClickHouse.

    RecordAuditEvents ─► writer (group commit: dedupe, seq + hash chain) ─► log (fsync) ─► ack
                                                                              │
                                                   flusher ───────────────────┴─► audit_events ─► log commit

* The chain is assigned at one serialisation point: the writer task of this process,
  before the append. Each tenant's events get seq 1, 2, 3, ... and carry the hash of the
  previous one; hash = sha256 over a canonical JSON of the stored fields plus prev_hash. The
  log holds the chained rows, so a replay after a crash inserts exactly the same rows (rows
  whose seq and hash are already stored are skipped: the table is append-only, not deduplicating).
* One writer per chain. Embedded chDB: the data directory is locked (servers/metering/storage/dirlock.py),
  so a second metering process on it refuses to start. A shared ClickHouse server
  (CLICKHOUSE_URL) has no such lock: the writer re-reads each tenant's stored head before every
  batch it chains for that tenant, so instances that take turns continue each other's chain,
  and two that append at the very same moment (or before the other's rows are flushed) fork
  it — which verify reports as a FORK (two well-formed events with one seq, one predecessor).
* The head anchor: after each flush, the newest (seq, hash, expiry) of each tenant flushed is
  written to `audit_heads`, outside the events table. Verify requires the chain to reach it
  (a removed tail is reported after a restart too) and to hold its hash there; an expected
  head from an earlier verify, kept by the user, is checked the same way (an external witness
  that also catches a removal of the anchor with the tail).
* Idempotency: an event id is looked up among the unflushed rows (memory) and in ClickHouse
  before it gets a seq, so a redelivered event is acknowledged as a duplicate and never
  chained twice.
* `audit_events` is a plain MergeTree ordered by (tenant_id, seq), with a TTL on each row's
  expire_time (record time + the plan's retention). Expiry never decreases along a chain
  (a plan downgrade keeps the longer retention for later rows), so TTL only ever removes a
  prefix, and each row carries its predecessor's expiry: a missing prefix whose retention
  has not ended is reported as removed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from servers.metering.audit.chain import EMPTY_HEAD, AuditRow, Head, NewEvent, Verification, chain
from servers.metering.storage.clickhouse import DATABASE, ChdbBackend, ClickHouseBackend
from servers.metering.storage.flusher import LogFlusher, WriteRequest
from servers.metering.storage.log import LogCodec, LogEntry, UsageLog
from servers.metering.storage.sqlite import from_micros, to_micros

log = logging.getLogger("copilot.metering.audit")

TABLE = f"{DATABASE}.audit_events"
HEADS = f"{DATABASE}.audit_heads"
VERIFY_PAGE = 5_000

COLUMNS = ("tenant_id", "seq", "event_id", "kind", "actor", "actor_roles", "service", "occur_time",
           "record_time", "details", "expire_time", "prev_expire", "prev_hash", "hash")

SCHEMA = (
    f"CREATE DATABASE IF NOT EXISTS {DATABASE}",
    f"""CREATE TABLE IF NOT EXISTS {TABLE} (
        tenant_id String,
        seq UInt64,
        event_id String,
        kind LowCardinality(String),
        actor String,
        actor_roles String,
        service LowCardinality(String),
        occur_time DateTime64(6, 'UTC'),
        record_time DateTime64(6, 'UTC'),
        details String,
        expire_time DateTime64(6, 'UTC'),
        prev_expire Int64,
        prev_hash String,
        hash String,
        INDEX event_id_idx event_id TYPE bloom_filter GRANULARITY 4
    ) ENGINE = MergeTree
    PARTITION BY toYYYYMM(record_time)
    ORDER BY (tenant_id, seq)
    TTL toDateTime(expire_time)
    SETTINGS fsync_after_insert = 1, fsync_part_directory = 1""",
    # One row per tenant once merged (the highest seq); read with ORDER BY seq DESC before that.
    f"""CREATE TABLE IF NOT EXISTS {HEADS} (
        tenant_id String,
        seq UInt64,
        hash String,
        expire_time DateTime64(6, 'UTC'),
        anchor_time DateTime64(6, 'UTC')
    ) ENGINE = ReplacingMergeTree(seq)
    ORDER BY tenant_id
    SETTINGS fsync_after_insert = 1, fsync_part_directory = 1""",
)
HEAD_COLUMNS = ("tenant_id", "seq", "hash", "expire_time", "anchor_time")

_SELECT = ("SELECT tenant_id, seq, event_id, kind, actor, actor_roles, service, toUnixTimestamp64Micro(occur_time), "
           "toUnixTimestamp64Micro(record_time), details, toUnixTimestamp64Micro(expire_time), prev_expire, "
           f"prev_hash, hash FROM {TABLE}")

EXISTING_SQL = (f"SELECT DISTINCT event_id FROM {TABLE} "
                f"WHERE tenant_id = {{tenant:String}} AND event_id IN {{ids:Array(String)}}")
# Audit event ids are made fresh per event (servers/common/audit.py); the same id comes again
# unmarked only by gRPC's retry of one RecordAuditEvents call (its 5 s deadline) or Envoy's
# (the route's 30 s): two minutes covers both.
FIRST_DELIVERY_SPAN_S = 120.0
RECENT_SQL = f"SELECT tenant_id, event_id FROM {TABLE} WHERE record_time >= {{since:DateTime64(6, 'UTC')}}"
HEAD_SQL = (f"SELECT seq, hash, toUnixTimestamp64Micro(expire_time) FROM {TABLE} "
            f"WHERE tenant_id = {{tenant:String}} ORDER BY seq DESC LIMIT 1")
STORED_SEQS_SQL = (f"SELECT seq, hash FROM {TABLE} WHERE tenant_id = {{tenant:String}} "
                   f"AND seq >= {{lo:UInt64}} AND seq <= {{hi:UInt64}}")
# Filters with neutral defaults, so one statement serves every combination.
LIST_SQL = (f"{_SELECT} WHERE tenant_id = {{tenant:String}} AND seq > {{after:UInt64}} "
            f"AND occur_time >= {{start:DateTime64(6, 'UTC')}} AND occur_time < {{end:DateTime64(6, 'UTC')}} "
            f"AND ({{actor:String}} = '' OR actor = {{actor:String}}) "
            f"AND (empty({{kinds:Array(String)}}) OR has({{kinds:Array(String)}}, kind)) "
            f"ORDER BY seq LIMIT {{limit:UInt32}}")
# A duplicate seq sorts next to its twin, so the verifier sees both (within a page).
VERIFY_SQL = (f"{_SELECT} WHERE tenant_id = {{tenant:String}} AND toInt64(seq) > {{after:Int64}} "
              f"ORDER BY seq, hash LIMIT {{limit:UInt32}}")
ERASE_SQL = f"DELETE FROM {TABLE} WHERE tenant_id = {{tenant:String}}"
ANCHOR_SQL = (f"SELECT seq, hash, toUnixTimestamp64Micro(expire_time) FROM {HEADS} "
              f"WHERE tenant_id = {{tenant:String}} ORDER BY seq DESC LIMIT 1")
ERASE_ANCHOR_SQL = f"DELETE FROM {HEADS} WHERE tenant_id = {{tenant:String}}"
COUNT_SQL = f"SELECT count() FROM {TABLE} WHERE tenant_id = {{tenant:String}}"

EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2200, 1, 1, tzinfo=UTC)


# --- The durable log's records -----------------------------------------------------------

def _encode(rows: Sequence[AuditRow], record_time: datetime) -> bytes:
    return json.dumps({"rt": to_micros(record_time), "rows": [asdict(r) for r in rows]},
                      separators=(",", ":"), ensure_ascii=False).encode()


def _decode(payload: bytes) -> tuple[datetime, list[AuditRow]]:
    body = json.loads(payload)
    return from_micros(body["rt"]), [AuditRow(**r) for r in body["rows"]]


AUDIT_CODEC = LogCodec(_encode, _decode)


@dataclass
class Page:
    rows: list[AuditRow]
    last_seq: int
    more: bool


_Request = WriteRequest[NewEvent, tuple[int, int]]


class AuditStore(LogFlusher[_Request]):
    _flush_name = "audit"
    _existing_sql = EXISTING_SQL
    _recent_sql = RECENT_SQL
    first_delivery_span_s = FIRST_DELIVERY_SPAN_S

    def __init__(self, db: ClickHouseBackend, audit_log: UsageLog, *, owns_db: bool = False,
                 flush_interval_s: float = 0.2, flush_max_rows: int = 20_000, shared: bool | None = None) -> None:
        """`shared`: whether other writers may append to the same table (default: unless the
        backend is the embedded, locked chDB)."""
        super().__init__(db, audit_log, flush_interval_s, flush_max_rows)
        self._owns_db = owns_db
        self._heads: dict[str, Head] = {}
        # The newest row of each tenant this process moved into ClickHouse (what it anchored).
        self._anchors: dict[str, Head] = {}
        # Other writers may append to the same chains: only the embedded store is locked to one.
        self._shared = not isinstance(db, ChdbBackend) if shared is None else shared
        if self._shared:
            self._recent = None  # another writer's ids are not in this process's memory
        self._move_lock = asyncio.Lock()
        # Whether the next flush must skip rows already stored: after a replay (a crash
        # between an insert and the log's commit) or an insert that failed (it may have landed).
        self._check_stored = False

    # --- Lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        if self._owns_db:
            await self.db.open()
        for statement in SCHEMA:
            await self.db.command(statement)
        await self._open_log()

    def _replaying(self) -> None:
        self._check_stored = True

    async def close(self) -> None:
        await self._close_log()
        if self._owns_db:
            await self.db.close()

    async def ping(self) -> bool:
        return await self.log.ping()

    @property
    def pending_rows(self) -> int:
        return sum(len(e.events) for e in self._pending)

    # --- Recording -----------------------------------------------------------------------

    async def record(self, events: Sequence[NewEvent], check_stored: bool = True) -> tuple[int, int]:
        """(recorded, duplicates), once the new events are durable in the log. `check_stored`
        False: a first delivery (the caller did not send these ids before), so ClickHouse is
        asked only about ids the store's memory of recent ids cannot prove new (flusher.py) —
        a lookup there costs milliseconds of CPU, queued behind the flusher's inserts on the
        one ClickHouse thread."""
        self._ensure_open()
        result: tuple[int, int] = await self._enqueue(
            _Request(events, asyncio.get_running_loop().create_future(), check_stored))
        return result

    async def _write_group(self, group: list[_Request]) -> None:
        known = await self._recorded_keys(group)
        for tenant_id in {e.tenant_id for r in group for e in r.events}:
            if self._shared or tenant_id not in self._heads:
                await self._refresh_head(tenant_id)
        now = datetime.now(UTC)
        heads = dict(self._heads)
        seen: set[tuple[str, str]] = set()
        rows: list[AuditRow] = []
        results: list[tuple[int, int]] = []
        for request in group:
            recorded = 0
            for e in request.events:
                key = (e.tenant_id, e.event_id)
                if key in known or key in seen:
                    continue
                seen.add(key)
                row = chain(heads.get(e.tenant_id, EMPTY_HEAD), e, now)
                heads[e.tenant_id] = Head(row.seq, row.hash, row.expire_us)
                rows.append(row)
                recorded += 1
            results.append((recorded, len(request.events) - recorded))
        if rows:
            entry = await self.log.append(rows, now)
            # No await from here: the heads move only once the rows are durable.
            self._heads.update(heads)
            self._add_pending(entry)
            if self.pending_rows >= self._flush_max:
                self._wake_flusher.set()
        self._resolve(group, results)

    async def _refresh_head(self, tenant_id: str) -> None:
        """Continues from the stored head when it is ahead of ours (another writer's rows)."""
        stored = await self._load_head(tenant_id)
        known = self._heads.get(tenant_id)
        if known is not None and stored.seq == known.seq and stored.hash != known.hash:
            log.error("audit chain forked: another writer stored another event at this seq",
                      extra={"tenant_id": tenant_id, "seq": stored.seq})
        if known is None or stored.seq > known.seq:
            if known is not None:
                log.warning("another writer extended this audit chain; continuing from its head",
                            extra={"tenant_id": tenant_id, "ours": known.seq, "stored": stored.seq})
            self._heads[tenant_id] = stored

    async def _load_head(self, tenant_id: str) -> Head:
        rows = await self.db.query(HEAD_SQL, {"tenant": tenant_id})
        if not rows:
            return EMPTY_HEAD
        return Head(int(rows[0][0]), rows[0][1], int(rows[0][2]))

    async def _load_anchor(self, tenant_id: str) -> Head | None:
        rows = await self.db.query(ANCHOR_SQL, {"tenant": tenant_id})
        stored = Head(int(rows[0][0]), rows[0][1], int(rows[0][2])) if rows else None
        mine = self._anchors.get(tenant_id)
        if mine is not None and (stored is None or mine.seq > stored.seq):
            return mine  # (the stored anchor was removed, or lags: its write failed after the insert)
        return stored

    def _add_pending(self, entry: LogEntry) -> None:
        super()._add_pending(entry)
        for row in entry.events:
            # Replayed rows are newer than anything in ClickHouse.
            head = self._heads.get(row.tenant_id)
            if head is None or row.seq > head.seq:
                self._heads[row.tenant_id] = Head(row.seq, row.hash, row.expire_us)

    # --- Flushing ------------------------------------------------------------------------

    async def flush_once(self) -> int:
        async with self._move_lock:
            batch, size = self._oldest_batch()
            if not batch:
                return 0
            rows: list[AuditRow] = [row for entry in batch for row in entry.events]
            stored: set[tuple[str, int, str]] = set()
            if self._check_stored:
                # Append-only table: rows a crash (or a failed insert that did land) already
                # stored are skipped, by their seq and hash (another writer's row at the same
                # seq is a fork to keep visible, not ours).
                by_tenant: dict[str, list[int]] = {}
                for row in rows:
                    by_tenant.setdefault(row.tenant_id, []).append(row.seq)
                for tenant_id, seqs in by_tenant.items():
                    found = await self.db.query(STORED_SEQS_SQL,
                                                {"tenant": tenant_id, "lo": min(seqs), "hi": max(seqs)})
                    stored.update((tenant_id, int(r[0]), r[1]) for r in found)
            fresh = [row.to_db() for row in rows if (row.tenant_id, row.seq, row.hash) not in stored]
            heads: dict[str, Head] = {}
            for row in rows:
                if row.seq > heads.get(row.tenant_id, EMPTY_HEAD).seq:
                    heads[row.tenant_id] = Head(row.seq, row.hash, row.expire_us)
            now = datetime.now(UTC)
            try:
                await self.db.insert(fresh, TABLE, COLUMNS)
                # After the events: an anchor never names a row that is not stored.
                await self.db.insert([(t, h.seq, h.hash, from_micros(h.expire_us), now) for t, h in heads.items()],
                                     HEADS, HEAD_COLUMNS)
            except BaseException:
                self._check_stored = True
                raise
            self._check_stored = False
            for tenant_id, head in heads.items():
                if head.seq > self._anchors.get(tenant_id, EMPTY_HEAD).seq:
                    self._anchors[tenant_id] = head
            self._take_flushed(batch)
        await self.log.commit(batch)
        return size

    # --- Reading -------------------------------------------------------------------------

    async def list_page(self, tenant_id: str, *, after: int, limit: int, start: datetime | None = None,
                        end: datetime | None = None, actor: str = "", kinds: Sequence[str] = ()) -> Page:
        """Events after seq `after`, oldest first; everything acknowledged is included."""
        await self.flush()
        raw = await self.db.query(LIST_SQL, {"tenant": tenant_id, "after": after, "start": start or EARLIEST,
                                             "end": end or LATEST, "actor": actor, "kinds": list(kinds),
                                             "limit": limit + 1})
        rows = [AuditRow.from_db(r) for r in raw[:limit]]
        return Page(rows=rows, last_seq=rows[-1].seq if rows else after, more=len(raw) > limit)

    async def verify(self, tenant_id: str, expected: Head | None = None) -> Verification:
        """Walks the tenant's chain and reports its first break; the chain must also reach
        the head anchor and, if given, the `expected` head (seq and hash of an earlier verify)."""
        await self.flush()
        # Read before the walk: whatever it names was stored before the walk began.
        anchor = await self._load_anchor(tenant_id)
        result = Verification(tenant_id, watch=frozenset(h.seq for h in (anchor, expected) if h is not None))
        after = -1
        while result.ok:
            raw = await self.db.query(VERIFY_SQL, {"tenant": tenant_id, "after": after, "limit": VERIFY_PAGE})
            if not raw:
                break
            rows = [AuditRow.from_db(r) for r in raw]
            now_us = to_micros(datetime.now(UTC))
            # Hashing thousands of rows is CPU work: off the event loop.
            await asyncio.to_thread(result.feed, rows, now_us)
            after = rows[-1].seq
            if len(raw) < VERIFY_PAGE:
                break
        result.finish(anchor, expected, to_micros(datetime.now(UTC)))
        return result

    async def count(self, tenant_id: str) -> int:
        await self.flush()
        rows = await self.db.query(COUNT_SQL, {"tenant": tenant_id})
        return int(rows[0][0])

    async def erase_tenant(self, tenant_id: str) -> None:
        """Removes the tenant's whole trail (tenant deletion with COPILOT_AUDIT_ON_TENANT_DELETE=erase)."""
        await self.flush()
        async with self._move_lock:
            await self.db.command(ERASE_SQL, {"tenant": tenant_id})
            await self.db.command(ERASE_ANCHOR_SQL, {"tenant": tenant_id})
            self._heads.pop(tenant_id, None)
            self._anchors.pop(tenant_id, None)
        log.info("audit trail of a deleted tenant erased", extra={"tenant_id": tenant_id})
