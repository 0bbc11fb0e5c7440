"""Circuit breakers per provider and per tenant."""

from __future__ import annotations

import time

from servers.generation.resilience import Breakers, CircuitBreaker


def test_opens_after_threshold_then_probes_once() -> None:
    breaker = CircuitBreaker("p", failure_threshold=2, reset_after_s=0.05)
    breaker.failure()
    assert breaker.allow()
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    time.sleep(0.06)
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    breaker.failure()  # the probe failed: open again
    assert breaker.state == "open"
    time.sleep(0.06)
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow()


def test_a_failing_tenant_opens_only_its_own_breaker() -> None:
    breakers = Breakers(provider_threshold=10, tenant_threshold=2)
    for _ in range(2):
        breakers.record("openai", "bad", ok=False)
    assert breakers.allow("openai", "bad") is not None
    assert breakers.allow("openai", "good") is None
    assert breakers.allow("anthropic", "bad") is None
