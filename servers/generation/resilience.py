"""Circuit breakers: stop calling a provider (or a provider for one tenant) that keeps
failing, let one probe through after a cool-down, close again when it succeeds."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from servers.common import metrics


@dataclass
class CircuitBreaker:
    name: str
    failure_threshold: int = 5
    reset_after_s: float = 30.0
    failures: int = 0
    opened_at: float | None = None
    _probing: bool = field(default=False, repr=False)

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        if time.monotonic() - self.opened_at >= self.reset_after_s:
            return "half-open"
        return "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self._probing:
            self._probing = True  # one probe at a time
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self._probing = False

    def failure(self) -> None:
        self.failures += 1
        self._probing = False
        if self.failures >= self.failure_threshold or self.opened_at is not None:
            self.opened_at = time.monotonic()


class Breakers:
    """One breaker per provider and one per (tenant, provider): a provider that is down
    for everyone opens the first; a tenant whose requests keep failing (its prompts, its
    model) opens only its own."""

    def __init__(self, provider_threshold: int = 5, tenant_threshold: int = 3, reset_after_s: float = 30.0) -> None:
        self._provider_threshold = provider_threshold
        self._tenant_threshold = tenant_threshold
        self._reset = reset_after_s
        self._breakers: dict[str, CircuitBreaker] = {}
        metrics.SOURCES.register("circuit_breakers", self, "metric_families")

    def track(self, provider: str) -> None:
        """Makes the provider's shared breaker now, so its state is exported before the
        first call (and its error counters start at 0)."""
        self._get(f"provider:{provider}", self._provider_threshold)
        metrics.provider_configured(provider)

    def _states(self) -> Iterator[tuple[str, str, str]]:
        for key, breaker in list(self._breakers.items()):
            scope, _, rest = key.partition(":")
            yield rest.rpartition(":")[2] if scope == "tenant" else rest, scope, breaker.state

    def metric_families(self) -> list[Any]:
        """copilot_circuit_breaker_state at scrape time (a breaker goes half-open by time alone)."""
        return metrics.breaker_families(self._states())

    def _get(self, key: str, threshold: int) -> CircuitBreaker:
        breaker = self._breakers.get(key)
        if breaker is None:
            breaker = self._breakers[key] = CircuitBreaker(key, threshold, self._reset)
        return breaker

    def pair(self, provider: str, tenant: str) -> tuple[CircuitBreaker, CircuitBreaker]:
        return (self._get(f"provider:{provider}", self._provider_threshold),
                self._get(f"tenant:{tenant}:{provider}", self._tenant_threshold))

    def allow(self, provider: str, tenant: str) -> str | None:
        """None when a call may go ahead, else which breaker is open."""
        shared, own = self.pair(provider, tenant)
        if not shared.allow():
            return f"circuit breaker for provider {provider} is open"
        if not own.allow():
            return f"circuit breaker for provider {provider} is open for this tenant"
        return None

    def record(self, provider: str, tenant: str, ok: bool) -> None:
        for breaker in self.pair(provider, tenant):
            breaker.success() if ok else breaker.failure()
