"""Fixed-window limiter maths (in-process limiter; the Redis one shares `decide`)."""

from __future__ import annotations

import pytest

from servers.edge.config import FREE_LIMITS, SUSPENDED_LIMITS, limits_of
from servers.edge.limiter import HOUR, MINUTE, SECOND, InProcessLimiter, Window, decide

T0 = 1_700_000_040.0  # a minute boundary (divisible by 60, not by 3600)


def test_limits_of_skips_unlimited_units() -> None:
    assert limits_of(5, 0, 100) == (Window(SECOND, 1, 5), Window(HOUR, 3600, 100))
    assert limits_of(0, 0, 0) == ()
    assert (Window(SECOND, 1, 5), Window(MINUTE, 60, 100), Window(HOUR, 3600, 1000)) == FREE_LIMITS


def test_admits_up_to_the_limit_then_refuses_until_the_window_resets() -> None:
    limiter = InProcessLimiter()
    limits = limits_of(3, 0, 0)
    decisions = [limiter.hit_now("acme", limits, now=T0 + 0.25) for _ in range(4)]
    assert [d.over_limit for d in decisions] == [False, False, False, True]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert decisions[3].window == Window(SECOND, 1, 3)
    assert decisions[3].reset_s == pytest.approx(0.75)
    # Same window, later in it: still refused.
    assert limiter.hit_now("acme", limits, now=T0 + 0.99).over_limit
    # Next window: admitted again with the full allowance.
    fresh = limiter.hit_now("acme", limits, now=T0 + 1.0)
    assert not fresh.over_limit and fresh.remaining == 2
    assert fresh.reset_s == pytest.approx(1.0)


def test_refused_hits_are_not_counted() -> None:
    limiter = InProcessLimiter()
    limits = limits_of(2, 0, 5)
    for _ in range(2):
        assert not limiter.hit_now("acme", limits, now=T0).over_limit
    for _ in range(50):  # hammering a full second window must not burn the hour
        assert limiter.hit_now("acme", limits, now=T0 + 0.5).over_limit
    later = [limiter.hit_now("acme", limits, now=T0 + 1.5) for _ in range(3)]
    assert [d.over_limit for d in later] == [False, False, True]
    # Only the 4 admitted hits count against the hour: one left.
    last = limiter.hit_now("acme", limits, now=T0 + 2.5)
    assert not last.over_limit and last.remaining == 0 and last.window == Window(HOUR, 3600, 5)
    over = limiter.hit_now("acme", limits, now=T0 + 3.5)
    assert over.over_limit and over.window == Window(HOUR, 3600, 5)


def test_the_binding_window_is_the_tightest_and_the_longest_when_over() -> None:
    limiter = InProcessLimiter()
    limits = limits_of(10, 4, 0)
    ok = limiter.hit_now("acme", limits, now=T0 + 30)
    assert (ok.window, ok.remaining) == (Window(MINUTE, 60, 4), 3)
    assert ok.reset_s == pytest.approx(30)
    for _ in range(3):
        limiter.hit_now("acme", limits, now=T0 + 30)
    over = limiter.hit_now("acme", limits, now=T0 + 31)
    assert over.over_limit and over.window == Window(MINUTE, 60, 4)
    assert over.reset_s == pytest.approx(29)
    # When several windows are exhausted, a retry has to wait for the last to reset.
    both = decide(limits_of(1, 1, 0), [1, 1], 1, T0 + 30.5)
    assert both.over_limit and both.window == Window(MINUTE, 60, 1)
    assert both.reset_s == pytest.approx(29.5)


def test_tenants_are_independent() -> None:
    limiter = InProcessLimiter()
    limits = limits_of(1, 0, 0)
    assert not limiter.hit_now("acme", limits, now=T0).over_limit
    assert limiter.hit_now("acme", limits, now=T0).over_limit
    assert not limiter.hit_now("globex", limits, now=T0).over_limit
    assert limiter.hit_now("globex", limits, now=T0).over_limit


def test_hits_addend_and_zero_limits() -> None:
    limiter = InProcessLimiter()
    limits = limits_of(10, 0, 0)
    assert limiter.hit_now("acme", limits, hits=7, now=T0).remaining == 3
    assert limiter.hit_now("acme", limits, hits=4, now=T0).over_limit
    assert limiter.hit_now("acme", limits, hits=3, now=T0).remaining == 0
    # A suspended tenant gets nothing, and is told to back off for the minute.
    blocked = limiter.hit_now("gone", SUSPENDED_LIMITS, now=T0 + 10)
    assert blocked.over_limit and blocked.reset_s == pytest.approx(50)


def test_no_limits_means_unlimited() -> None:
    limiter = InProcessLimiter()
    for _ in range(1000):
        assert not limiter.hit_now("acme", (), now=T0).over_limit
    assert len(limiter) == 0


def test_prune_drops_tenants_whose_windows_all_rolled_over() -> None:
    clock = [T0]
    limiter = InProcessLimiter(clock=lambda: clock[0])
    limiter.hit_now("acme", limits_of(5, 0, 0))
    limiter.hit_now("globex", limits_of(5, 0, 100))
    clock[0] = T0 + 2
    assert limiter.prune() == 1  # globex's hour window is still current
    assert len(limiter) == 1


async def test_async_hit_is_the_same_decision() -> None:
    limiter = InProcessLimiter(clock=lambda: T0)
    limits = limits_of(1, 0, 0)
    assert not (await limiter.hit("acme", limits)).over_limit
    assert (await limiter.hit("acme", limits)).over_limit
