"""The durable outbox (servers/common/outbox/) as usage uses it: `record` is durable before
it returns, replayed with the same event id, group-committed under load."""

from __future__ import annotations

import asyncio
from pathlib import Path

from copilot.v1 import metering_pb2
from servers.common.outbox import Outbox


class FlakyMetering:
    def __init__(self) -> None:
        self.up = True
        self.received: list[tuple[str, str]] = []

    async def deliver(self, tenant: str, events: list[metering_pb2.UsageEvent], redelivery: bool) -> None:
        await asyncio.sleep(0)
        if not self.up:
            raise ConnectionError("metering down")
        self.received.extend((tenant, e.event_id) for e in events)


def _event(n: int) -> metering_pb2.UsageEvent:
    return metering_pb2.UsageEvent(event_id=f"answer:{n}", requests=1, input_tokens=10, output_tokens=n)


async def test_delivered_events_leave_nothing_behind(tmp_path: Path) -> None:
    metering = FlakyMetering()
    outbox = Outbox(tmp_path, metering.deliver, metering_pb2.UsageEvent)
    assert await outbox.record("acme", _event(1))
    await outbox.settled()
    assert metering.received == [("acme", "answer:1")] and outbox.pending_count() == 0


async def test_undelivered_events_survive_a_restart_and_keep_their_ids(tmp_path: Path) -> None:
    metering = FlakyMetering()
    metering.up = False
    first = Outbox(tmp_path, metering.deliver, metering_pb2.UsageEvent)
    for n in range(3):
        assert not await first.record("acme", _event(n))
    assert await first.record("globex", _event(9)) is False
    assert first.pending_count() == 4
    # A new process (the first one is gone without flushing): replays on start.
    metering.up = True
    second = Outbox(tmp_path, metering.deliver, metering_pb2.UsageEvent, interval_s=0.05)
    await second.start()
    for _ in range(100):
        if second.pending_count() == 0:
            break
        await asyncio.sleep(0.02)
    await second.stop()
    assert sorted(metering.received) == [("acme", "answer:0"), ("acme", "answer:1"), ("acme", "answer:2"),
                                         ("globex", "answer:9")]


async def test_background_loop_retries_until_metering_is_back(tmp_path: Path) -> None:
    metering = FlakyMetering()
    metering.up = False
    outbox = Outbox(tmp_path, metering.deliver, metering_pb2.UsageEvent, interval_s=0.02)
    await outbox.start()
    assert not await outbox.record("acme", _event(1))
    await asyncio.sleep(0.1)
    assert metering.received == [] and outbox.pending_count() == 1
    metering.up = True
    for _ in range(200):
        if outbox.pending_count() == 0:
            break
        await asyncio.sleep(0.02)
    await outbox.stop()
    assert metering.received == [("acme", "answer:1")]


class PickyMetering(FlakyMetering):
    """Refuses one tenant's events, takes the others'."""

    def __init__(self, refused: str) -> None:
        super().__init__()
        self.refused = refused

    async def deliver(self, tenant: str, events: list[metering_pb2.UsageEvent], redelivery: bool) -> None:
        await asyncio.sleep(0)
        if tenant == self.refused and not self.up:
            raise ConnectionError("refused")
        self.received.extend((tenant, e.event_id) for e in events)


def _on_disk(directory: Path) -> str:
    return "".join(p.read_text() for p in directory.glob("*.json"))


async def test_concurrent_events_are_group_committed_and_replayed(tmp_path: Path) -> None:
    metering = FlakyMetering()
    metering.up = False
    first = Outbox(tmp_path, metering.deliver, metering_pb2.UsageEvent)
    results = await asyncio.gather(*(first.record(f"t{n % 3}", _event(n)) for n in range(20)))
    assert results == [False] * 20
    # Fewer fsync'd writes than events: the events that arrived during a write shared the next.
    assert 1 <= first.commits < 20
    second = Outbox(tmp_path, metering.deliver, metering_pb2.UsageEvent, interval_s=0.05)
    metering.up = True
    assert await second.flush() == 20
    assert sorted(metering.received) == sorted((f"t{n % 3}", f"answer:{n}") for n in range(20))
    assert second.pending_count() == 0


async def test_a_group_file_stays_until_every_event_in_it_is_delivered(tmp_path: Path) -> None:
    metering = PickyMetering(refused="globex")
    metering.up = False
    outbox = Outbox(tmp_path, metering.deliver, metering_pb2.UsageEvent)
    results = await asyncio.gather(*(outbox.record("globex" if n % 2 else "acme", _event(n)) for n in range(6)))
    await outbox.settled()
    assert results == [n % 2 == 0 for n in range(6)]
    # The undelivered globex events are still on disk (with acme's, when they shared a file).
    on_disk = await asyncio.to_thread(_on_disk, tmp_path)
    assert all(f"answer:{n}" in on_disk for n in (1, 3, 5))
    metering.up = True
    await outbox.flush()
    assert outbox.pending_count() == 0
    assert {e for t, e in metering.received if t == "globex"} == {"answer:1", "answer:3", "answer:5"}
