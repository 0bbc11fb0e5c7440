"""The audit trail's hash chain in embedded ClickHouse (chDB): one seq per event, idempotent
on redelivery, durable across a restart without a flush, and every tampering done directly
in the store (an edited row, a removed row, a removed tail, an inserted row) reported by
verify at the right place; retention expiry is not mistaken for tampering."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from servers.common.errors import Unavailable
from servers.metering.audit.chain import (
    DUPLICATE,
    FORK,
    GENESIS,
    HASH_MISMATCH,
    HEAD_MISMATCH,
    MISSING,
    Head,
    NewEvent,
    chain,
)
from servers.metering.audit.store import AUDIT_CODEC, COLUMNS, HEADS, TABLE, AuditStore
from servers.metering.storage.clickhouse import ChdbBackend
from servers.metering.storage.dirlock import DataDirInUse
from servers.metering.storage.log import LocalLog, LogEntry


def event(n: int, tenant: str = "acme", *, actor: str = "alice", kind: str = "question",
          retention_days: int = 365) -> NewEvent:
    return NewEvent(tenant_id=tenant, event_id=f"e{n}", kind=kind, actor=actor, actor_roles="member",
                    service="generation", occur_time=datetime.now(UTC),
                    details=json.dumps({"question": {"question": f"q{n}"}}), retention_days=retention_days)


def make(tmp_path: Path, shared: bool | None = None) -> AuditStore:
    return AuditStore(ChdbBackend(tmp_path / "chdb"), LocalLog(tmp_path / "audit-log", codec=AUDIT_CODEC),
                      owns_db=True, flush_interval_s=3600, shared=shared)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[AuditStore]:
    s = make(tmp_path)
    await s.open()
    yield s
    await s.close()


async def tamper(store: AuditStore, sql: str) -> None:
    await store.db.command(sql + " SETTINGS mutations_sync = 2" if sql.startswith("ALTER") else sql)


async def test_each_event_gets_the_next_seq_once_and_links_to_the_previous(store: AuditStore) -> None:
    assert await store.record([event(1), event(2), event(1)]) == (2, 1)
    assert await store.record([event(2)]) == (0, 1)  # still in the log only
    await store.flush()
    assert await store.record([event(2), event(3)]) == (1, 1)  # e2 in ClickHouse only
    assert await store.record([event(1, "globex")]) == (1, 0)  # same id, other tenant
    page = await store.list_page("acme", after=0, limit=10)
    assert [r.seq for r in page.rows] == [1, 2, 3] and [r.event_id for r in page.rows] == ["e1", "e2", "e3"]
    assert page.rows[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in zip(page.rows, page.rows[1:], strict=False))
    assert [r.seq for r in (await store.list_page("globex", after=0, limit=10)).rows] == [1]
    result = await store.verify("acme")
    assert result.ok and (result.checked, result.first_seq, result.last_seq) == (3, 1, 3)
    assert result.head_hash == page.rows[-1].hash


async def test_paging_and_filters(store: AuditStore) -> None:
    await store.record([event(n, actor="bob" if n % 2 else "alice",
                              kind="question" if n < 6 else "documents_ingested") for n in range(1, 10)])
    first = await store.list_page("acme", after=0, limit=4)
    assert [r.seq for r in first.rows] == [1, 2, 3, 4] and first.more
    rest = await store.list_page("acme", after=first.last_seq, limit=10)
    assert [r.seq for r in rest.rows] == [5, 6, 7, 8, 9] and not rest.more
    bob = await store.list_page("acme", after=0, limit=10, actor="bob")
    assert [r.seq for r in bob.rows] == [1, 3, 5, 7, 9]
    ingested = await store.list_page("acme", after=0, limit=10, kinds=["documents_ingested"])
    assert [r.seq for r in ingested.rows] == [6, 7, 8, 9]
    future = await store.list_page("acme", after=0, limit=10, start=datetime.now(UTC) + timedelta(hours=1))
    assert future.rows == []


async def test_an_edited_row_is_reported_at_its_seq(store: AuditStore) -> None:
    await store.record([event(n) for n in range(1, 6)])
    await store.flush()
    await tamper(store, f"ALTER TABLE {TABLE} UPDATE details = '{{\"question\":{{\"question\":\"nothing\"}}}}' "
                        "WHERE tenant_id = 'acme' AND seq = 3")
    result = await store.verify("acme")
    assert not result.ok and result.first_break is not None
    assert (result.first_break.seq, result.first_break.problem) == (3, HASH_MISMATCH)


async def test_an_edited_actor_is_reported_too(store: AuditStore) -> None:
    await store.record([event(n) for n in range(1, 4)])
    await store.flush()
    await tamper(store, f"ALTER TABLE {TABLE} UPDATE actor = 'mallory' WHERE tenant_id = 'acme' AND seq = 2")
    result = await store.verify("acme")
    assert result.first_break is not None and (result.first_break.seq, result.first_break.problem) == (
        2, HASH_MISMATCH)


async def test_a_removed_row_is_reported_as_missing_at_its_seq(store: AuditStore) -> None:
    await store.record([event(n) for n in range(1, 8)])
    await store.flush()
    await tamper(store, f"DELETE FROM {TABLE} WHERE tenant_id = 'acme' AND seq = 4")
    result = await store.verify("acme")
    assert result.first_break is not None and (result.first_break.seq, result.first_break.problem) == (4, MISSING)
    assert (await store.verify("globex")).ok  # another tenant's (empty) chain is untouched


async def test_a_removed_first_row_and_a_removed_tail_are_reported(store: AuditStore) -> None:
    await store.record([event(n) for n in range(1, 6)])
    await store.flush()
    await tamper(store, f"DELETE FROM {TABLE} WHERE tenant_id = 'acme' AND seq = 1")
    first = await store.verify("acme")
    assert first.first_break is not None and (first.first_break.seq, first.first_break.problem) == (1, MISSING)
    await store.record([event(n, "globex") for n in range(1, 6)])
    await store.flush()
    await tamper(store, f"DELETE FROM {TABLE} WHERE tenant_id = 'globex' AND seq = 5")
    tail = await store.verify("globex")
    assert tail.first_break is not None and (tail.first_break.seq, tail.first_break.problem) == (5, MISSING)


async def test_an_inserted_duplicate_is_reported(store: AuditStore) -> None:
    await store.record([event(n) for n in range(1, 4)])
    await store.flush()
    await tamper(store, f"INSERT INTO {TABLE} SELECT * FROM {TABLE} WHERE tenant_id = 'acme' AND seq = 2")
    result = await store.verify("acme")
    assert result.first_break is not None and (result.first_break.seq, result.first_break.problem) == (2, DUPLICATE)


async def test_acknowledged_events_survive_a_restart_and_the_chain_continues(tmp_path: Path) -> None:
    first = make(tmp_path)
    await first.open()
    await first.record([event(n) for n in range(1, 4)])
    assert first.pending_rows == 3
    # A crash: nothing flushed, nothing closed (the log's fsync is what made them durable).
    await first.abandon()
    await first.log.close()
    await first.db.close()
    second = make(tmp_path)
    await second.open()  # replays the log into ClickHouse before serving
    try:
        assert await second.record([event(2), event(4)]) == (1, 1)
        await second.flush()
        rows = (await second.list_page("acme", after=0, limit=10)).rows
        assert [(r.seq, r.event_id) for r in rows] == [(1, "e1"), (2, "e2"), (3, "e3"), (4, "e4")]
        assert (await second.verify("acme")).ok
    finally:
        await second.close()


class CommitLostLog(LocalLog):
    """A log whose commits never land: what a crash between ClickHouse's insert and the
    log's checkpoint leaves behind."""

    async def commit(self, entries: Sequence[LogEntry]) -> None:
        return None


async def test_a_replay_of_rows_already_stored_inserts_nothing(tmp_path: Path) -> None:
    first = AuditStore(ChdbBackend(tmp_path / "chdb"), CommitLostLog(tmp_path / "audit-log", codec=AUDIT_CODEC),
                       owns_db=True, flush_interval_s=3600)
    await first.open()
    await first.record([event(n) for n in range(1, 4)])
    await first.flush()  # stored in ClickHouse, still uncommitted in the log
    assert await first.count("acme") == 3
    await first.close()
    second = make(tmp_path)
    await second.open()  # replays the three rows, which are already stored
    try:
        assert await second.count("acme") == 3
        assert (await second.verify("acme")).ok
    finally:
        await second.close()


async def test_expired_events_are_dropped_by_ttl_and_are_not_tampering(store: AuditStore) -> None:
    await store.record([event(n, retention_days=0) for n in range(1, 4)])  # expire at once
    await store.record([event(n, retention_days=365) for n in range(4, 6)])
    await store.flush()
    await store.record([event(n, "globex", retention_days=0) for n in range(1, 3)])  # a whole chain expires
    await store.flush()
    await store.db.command(f"OPTIMIZE TABLE {TABLE} FINAL")
    rows = (await store.list_page("acme", after=0, limit=10)).rows
    assert [r.seq for r in rows] == [4, 5]
    result = await store.verify("acme")
    assert result.ok and result.first_seq == 4
    # Its head anchor (seq 2) expired with it: not a removed tail.
    assert await store.count("globex") == 0 and (await store.verify("globex")).ok


async def test_retention_never_shrinks_along_a_chain(store: AuditStore) -> None:
    await store.record([event(1, retention_days=2555)])
    await store.record([event(2, retention_days=365)])  # a downgrade
    rows = (await store.list_page("acme", after=0, limit=10)).rows
    assert rows[1].expire_us >= rows[0].expire_us


async def test_erasing_a_tenant_removes_only_its_trail(store: AuditStore) -> None:
    await store.record([event(1), event(1, "globex")])
    await store.erase_tenant("acme")
    assert await store.count("acme") == 0 and await store.count("globex") == 1
    await store.record([event(7)])  # a new trail starts over
    assert [r.seq for r in (await store.list_page("acme", after=0, limit=10)).rows] == [1]
    assert (await store.verify("acme")).ok  # the old trail's head anchor went with it


async def test_a_second_store_on_the_same_data_directory_is_refused(store: AuditStore, tmp_path: Path) -> None:
    second = make(tmp_path)
    with pytest.raises(DataDirInUse) as refused:
        await second.open()
    message = str(refused.value)
    assert str(tmp_path / "chdb") in message and f"pid {os.getpid()}" in message
    assert await store.record([event(1)]) == (1, 0)  # the holder goes on
    await store.close()
    await second.open()  # free once the holder is gone
    await second.close()


async def test_a_fork_by_two_writers_is_reported_as_such(store: AuditStore) -> None:
    await store.record([event(n) for n in range(1, 5)])
    await store.flush()
    rows = (await store.list_page("acme", after=0, limit=10)).rows
    # What a second writer with a stale head would have stored: a well-formed seq 3 of its own.
    other = chain(Head(rows[1].seq, rows[1].hash, rows[1].expire_us), event(99), datetime.now(UTC))
    await store.db.insert([other.to_db()], TABLE, COLUMNS)
    result = await store.verify("acme")
    assert result.first_break is not None and (result.first_break.seq, result.first_break.problem) == (3, FORK)
    assert "forked" in result.first_break.detail and "e99" in result.first_break.detail


async def test_a_shared_writer_continues_from_the_head_another_writer_stored(tmp_path: Path) -> None:
    store = make(tmp_path, shared=True)
    await store.open()
    try:
        await store.record([event(1), event(2)])
        await store.flush()
        rows = (await store.list_page("acme", after=0, limit=10)).rows
        # Another metering instance on the same ClickHouse appends seq 3 meanwhile.
        other = chain(Head(rows[-1].seq, rows[-1].hash, rows[-1].expire_us), event(3), datetime.now(UTC))
        await store.db.insert([other.to_db()], TABLE, COLUMNS)
        await store.record([event(4)])
        await store.flush()
        assert [r.seq for r in (await store.list_page("acme", after=0, limit=10)).rows] == [1, 2, 3, 4]
        assert (await store.verify("acme")).ok
    finally:
        await store.close()


async def test_a_removed_tail_is_reported_after_a_restart_from_the_head_anchor(tmp_path: Path) -> None:
    first = make(tmp_path)
    await first.open()
    await first.record([event(n) for n in range(1, 6)])
    await first.flush()
    verified = await first.verify("acme")
    assert verified.ok and verified.anchor is not None and (verified.anchor.seq, verified.anchor.hash) == (
        5, verified.head_hash)
    witness = Head(verified.last_seq, verified.head_hash, 0)  # what the user keeps elsewhere
    await first.close()

    second = make(tmp_path)  # a new process: nothing in memory about the chain
    await second.open()
    try:
        await tamper(second, f"DELETE FROM {TABLE} WHERE tenant_id = 'acme' AND seq >= 4")
        result = await second.verify("acme")
        assert result.first_break is not None and (result.first_break.seq, result.first_break.problem) == (4, MISSING)
        assert "ends at seq 3 but the head anchor records seq 5: events 4..5 were removed" in result.first_break.detail
        # Remove the anchor too: only the user's witness still knows.
        await tamper(second, f"DELETE FROM {HEADS} WHERE tenant_id = 'acme'")
        assert (await second.verify("acme")).ok
        caught = await second.verify("acme", expected=witness)
        assert caught.first_break is not None and (caught.first_break.seq, caught.first_break.problem) == (4, MISSING)
        assert "the expected head records seq 5" in caught.first_break.detail
        assert (await second.verify("acme", expected=Head(3, caught.head_hash, 0))).ok
        rewritten = await second.verify("acme", expected=Head(2, "0" * 64, 0))
        assert rewritten.first_break is not None and (rewritten.first_break.seq, rewritten.first_break.problem) == (
            2, HEAD_MISMATCH)
        # The chain goes on from what is stored; the new anchor is reached again.
        await second.record([event(6)])
        await second.flush()
        assert (await second.verify("acme")).ok
    finally:
        await second.close()


async def test_a_failed_append_chains_nothing_and_a_closed_store_refuses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = make(tmp_path)
    await store.open()
    try:
        assert await store.record([event(1)]) == (1, 0)

        def fail(fd: int) -> None:
            raise OSError(5, "disk on fire")

        monkeypatch.setattr(os, "fdatasync", fail)
        with pytest.raises(Unavailable) as failed:
            await store.record([event(2), event(3)])
        assert failed.value.reason == "LOG_FAILED"  # the log says why
        monkeypatch.undo()
        # The head did not move: the retry continues the chain at seq 2, with nothing claimed.
        assert await store.record([event(2), event(3)]) == (2, 0)
        await store.flush()
        page = await store.list_page("acme", after=0, limit=10)
        assert [r.seq for r in page.rows] == [1, 2, 3]
        assert (await store.verify("acme")).ok
    finally:
        await store.close()
    with pytest.raises(Unavailable) as closed:
        await store.record([event(4)])
    assert closed.value.reason == "STORE_CLOSED"
