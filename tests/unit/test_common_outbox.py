"""The outbox's `submit` (audit events): it returns at once with a future that resolves once the
event is on disk (never waiting for delivery); events handed in together are written by one
commit and delivered in one call per tenant once on disk, survive a delivery failure and a
restart, and each is delivered once with its own id (first deliveries say so, redeliveries too)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from copilot.v1 import audit_pb2
from servers.common.outbox import Outbox


class Metering:
    def __init__(self) -> None:
        self.up = True
        self.calls: list[tuple[str, list[str], bool]] = []

    async def deliver(self, tenant: str, events: list[audit_pb2.AuditEvent], redelivery: bool) -> None:
        await asyncio.sleep(0)
        if not self.up:
            raise ConnectionError("metering down")
        self.calls.append((tenant, [e.event_id for e in events], redelivery))

    def delivered(self) -> list[tuple[str, str]]:
        return sorted((t, i) for t, ids, _ in self.calls for i in ids)


def ev(n: int) -> audit_pb2.AuditEvent:
    return audit_pb2.AuditEvent(event_id=f"generation:{n}", kind=audit_pb2.AUDIT_EVENT_KIND_QUESTION)


async def wait_for(check: object, rounds: int = 200) -> None:
    for _ in range(rounds):
        if check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_submitted_events_go_out_in_one_batch_per_tenant(tmp_path: Path) -> None:
    metering = Metering()
    outbox = Outbox(tmp_path, metering.deliver, audit_pb2.AuditEvent)
    for n in range(5):
        outbox.submit("acme", ev(n))  # returns at once: nothing awaited
    outbox.submit("globex", ev(9))
    assert metering.calls == []
    await outbox.settled()
    assert sorted(metering.calls) == [("acme", [f"generation:{n}" for n in range(5)], False),
                                      ("globex", ["generation:9"], False)]
    await wait_for(lambda: outbox.pending_count() == 0)


async def test_submitted_events_survive_metering_down_and_a_restart(tmp_path: Path) -> None:
    metering = Metering()
    metering.up = False
    first = Outbox(tmp_path, metering.deliver, audit_pb2.AuditEvent)
    for n in range(3):
        first.submit("acme", ev(n))
    await first.settled()
    first.submit("acme", ev(3))
    await first.settled()
    assert first.pending_count() == 2  # two commits, on disk
    # A new process (the first one is gone): replays on start, whole files, marked as redelivery.
    metering.up = True
    second = Outbox(tmp_path, metering.deliver, audit_pb2.AuditEvent, interval_s=0.05, batch=2)
    await second.start()
    await wait_for(lambda: second.pending_count() == 0)
    await second.stop()
    assert metering.delivered() == [("acme", f"generation:{n}") for n in range(4)]
    assert all(redelivery for _, _, redelivery in metering.calls)


async def test_a_submitted_event_is_on_disk_before_it_is_delivered(tmp_path: Path) -> None:
    seen_on_disk: list[bool] = []

    async def deliver(tenant: str, events: list[audit_pb2.AuditEvent], redelivery: bool) -> None:
        on_disk = await asyncio.to_thread(lambda: "".join(p.read_text() for p in tmp_path.glob("*.json")))
        seen_on_disk.extend(e.event_id in on_disk for e in events)

    outbox = Outbox(tmp_path, deliver, audit_pb2.AuditEvent)
    outbox.submit("acme", ev(1))
    await outbox.settled()
    assert seen_on_disk == [True]
    await wait_for(lambda: outbox.pending_count() == 0)


async def test_a_submit_resolves_once_the_event_is_on_disk_and_not_before_delivery_is_needed(
        tmp_path: Path) -> None:
    metering = Metering()
    metering.up = False  # delivery fails: durability must not depend on it
    outbox = Outbox(tmp_path, metering.deliver, audit_pb2.AuditEvent)
    durable = outbox.submit("acme", ev(1))
    assert not durable.done()  # the group commit's fsync runs on a thread
    assert await durable is True
    on_disk = await asyncio.to_thread(lambda: "".join(p.read_text() for p in tmp_path.glob("*.json")))
    assert "generation:1" in on_disk and metering.calls == []
    await outbox.settled()
    assert outbox.pending_count() == 1  # kept for the background loop


async def test_a_submit_whose_write_fails_resolves_true_only_once_delivered(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # the outbox directory cannot be created: every write fails
    metering = Metering()
    outbox = Outbox(blocker / "outbox", metering.deliver, audit_pb2.AuditEvent)
    assert await outbox.submit("acme", ev(1)) is True
    assert metering.delivered() == [("acme", "generation:1")]
    metering.up = False
    assert await outbox.submit("acme", ev(2)) is False  # neither written nor delivered: reported
