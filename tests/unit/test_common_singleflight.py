"""Concurrent requests for one key share one run (servers/common/singleflight.py)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from servers.common.singleflight import SingleFlight


async def settle() -> None:
    """Lets the tasks started so far run up to their first wait."""
    for _ in range(10):
        await asyncio.sleep(0)


async def test_concurrent_callers_share_one_run_that_outlives_a_cancelled_caller() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    runs: list[str] = []
    gate = asyncio.Event()

    async def fetch(key: str) -> int:
        runs.append(key)
        await gate.wait()
        return len(runs)

    first = asyncio.ensure_future(flight.run("acme", lambda: fetch("acme")))
    second = asyncio.ensure_future(flight.run("acme", lambda: fetch("acme")))
    other = asyncio.ensure_future(flight.run("globex", lambda: fetch("globex")))
    await settle()
    assert sorted(runs) == ["acme", "globex"] and len(flight) == 2
    first.cancel()  # one caller gives up: the run goes on for the other
    with contextlib.suppress(asyncio.CancelledError):
        await first
    gate.set()
    assert await second == 2 and await other == 2
    assert len(flight) == 0
    # Done: the next call runs the work again.
    assert await flight.run("acme", lambda: fetch("acme")) == 3


async def test_a_failure_reaches_every_waiter_and_frees_the_key() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    gate = asyncio.Event()

    async def broken() -> int:
        await gate.wait()
        raise ConnectionError("peer down")

    waiters = [asyncio.ensure_future(flight.run("acme", broken)) for _ in range(3)]
    await settle()
    gate.set()
    for waiter in waiters:
        with pytest.raises(ConnectionError):
            await waiter
    assert len(flight) == 0

    async def fine() -> int:
        return 7

    assert await flight.run("acme", fine) == 7
