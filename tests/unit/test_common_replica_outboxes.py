"""Each replica's outboxes are its own (a second process with the same replica index refuses
to start), and replica 0 adopts the outboxes of replicas that no longer run when
COPILOT_REPLICAS is lowered, leaving alone those whose process still runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from servers.common.leadership import FileLock
from servers.common.outbox.replicas import LOCK_NAME, ReplicaInUse, ReplicaOutboxes
from servers.common.settings import Settings

OUTBOXES = ("usage-outbox", "audit-outbox")


def _settings(tmp_path: Path, replicas: int, replica: int = 0) -> Settings:
    return dataclasses.replace(Settings.from_env(), data_dir=tmp_path, replicas=replicas, replica=replica)


def _event(directory: Path, name: str, body: str = '{"tenant_id": "t", "event": {}}') -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(body)
    return path


async def test_a_replica_index_runs_in_one_process_only(tmp_path: Path) -> None:
    first = ReplicaOutboxes(_settings(tmp_path, 2, 1), "generation", OUTBOXES)
    await first.open()
    assert first.directory == tmp_path / "generation-1"
    second = ReplicaOutboxes(_settings(tmp_path, 2, 1), "generation", OUTBOXES)
    with pytest.raises(ReplicaInUse, match="generation-1 is in use by another process"):
        await second.open()
    await first.close()
    # Released on close (and by the kernel when its process dies): the index may run again.
    await second.open()
    await second.close()


async def test_replica_zero_adopts_the_outboxes_no_replica_runs(tmp_path: Path) -> None:
    # Ran with 4 replicas; now 2. Replica 2's directory is idle, replica 3's process still runs.
    _event(tmp_path / "generation-2" / "usage-outbox", "t~e1.json")
    _event(tmp_path / "generation-2" / "usage-outbox", "group~abc.json", '{"events": []}')
    _event(tmp_path / "generation-2" / "audit-outbox", "t~a1.json")
    _event(tmp_path / "generation-2" / "usage-outbox", "t~e9.tmp")  # a torn write, never a journal file
    _event(tmp_path / "generation-3" / "usage-outbox", "t~e3.json")
    _event(tmp_path / "generation-1" / "usage-outbox", "t~e5.json")  # replica 1 is still a replica
    # Already in replica 0's outbox under the same name: the same event, kept once.
    _event(tmp_path / "generation" / "usage-outbox", "t~e1.json")
    running = FileLock(tmp_path / "generation-3" / LOCK_NAME)
    assert running.try_acquire()
    try:
        zero = ReplicaOutboxes(_settings(tmp_path, 2, 0), "generation", OUTBOXES)
        await zero.open()
        await zero.close()
    finally:
        running.release()
    assert sorted(p.name for p in (tmp_path / "generation" / "usage-outbox").iterdir()) == \
        ["group~abc.json", "t~e1.json"]
    assert [p.name for p in (tmp_path / "generation" / "audit-outbox").iterdir()] == ["t~a1.json"]
    assert [p.name for p in (tmp_path / "generation-2" / "usage-outbox").iterdir()] == ["t~e9.tmp"]
    assert [p.name for p in (tmp_path / "generation-3" / "usage-outbox").iterdir()] == ["t~e3.json"]
    assert [p.name for p in (tmp_path / "generation-1" / "usage-outbox").iterdir()] == ["t~e5.json"]


async def test_other_replicas_adopt_nothing(tmp_path: Path) -> None:
    _event(tmp_path / "generation-5" / "usage-outbox", "t~e1.json")
    one = ReplicaOutboxes(_settings(tmp_path, 2, 1), "generation", OUTBOXES)
    await one.open()
    await one.close()
    assert (tmp_path / "generation-5" / "usage-outbox" / "t~e1.json").exists()
