"""The usage outbox: durable before acknowledged, replayed with the same event id."""

from __future__ import annotations

import asyncio
from pathlib import Path

from copilot.v1 import metering_pb2
from servers.generation.outbox import UsageOutbox


class FlakyMetering:
    def __init__(self) -> None:
        self.up = True
        self.received: list[tuple[str, str]] = []

    async def deliver(self, tenant: str, events: list[metering_pb2.UsageEvent]) -> None:
        await asyncio.sleep(0)
        if not self.up:
            raise ConnectionError("metering down")
        self.received.extend((tenant, e.event_id) for e in events)


def _event(n: int) -> metering_pb2.UsageEvent:
    return metering_pb2.UsageEvent(event_id=f"answer:{n}", requests=1, input_tokens=10, output_tokens=n)


async def test_delivered_events_leave_nothing_behind(tmp_path: Path) -> None:
    metering = FlakyMetering()
    outbox = UsageOutbox(tmp_path, metering.deliver)
    assert await outbox.record("acme", _event(1))
    await outbox.settled()
    assert metering.received == [("acme", "answer:1")] and outbox.pending_count() == 0


async def test_undelivered_events_survive_a_restart_and_keep_their_ids(tmp_path: Path) -> None:
    metering = FlakyMetering()
    metering.up = False
    first = UsageOutbox(tmp_path, metering.deliver)
    for n in range(3):
        assert not await first.record("acme", _event(n))
    assert await first.record("globex", _event(9)) is False
    assert first.pending_count() == 4
    # A new process (the first one is gone without flushing): replays on start.
    metering.up = True
    second = UsageOutbox(tmp_path, metering.deliver, interval_s=0.05)
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
    outbox = UsageOutbox(tmp_path, metering.deliver, interval_s=0.02)
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
