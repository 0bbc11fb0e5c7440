"""Prometheus metrics of a server process: every RPC by method and status, with latency;
provider calls, circuit breakers, caches, queue depths and per-tenant quota levels.

Labels stay bounded: method names come from the contracts, codes from gRPC, providers,
reasons and caches from short fixed lists. The one tenant label (quota levels) is capped:
at most `max_tenants` (COPILOT_METRICS_MAX_TENANTS) tenants get their own series, the rest share tenant="_other".
Each process serves /metrics on its own port.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("copilot.metrics")

# Tenants with a series of their own in the per-tenant quota metrics unless `serve` is told
# otherwise (the setting); everyone else is summed into tenant="_other". Bounds the series
# count at (N + 1) x 2 quotas per metric.
DEFAULT_TENANT_SERIES = 50
# Not a valid tenant id (they start with a letter or digit), so it never names a real tenant.
OTHER_TENANT = "_other"
# Tenants remembered at all (least recently seen forgotten first): bounds memory.
MAX_TRACKED_TENANTS = 10_000

RPC_REQUESTS = Counter(
    "copilot_rpc_requests_total", "RPCs served, by method and gRPC status code.", ["service", "method", "code"])
RPC_LATENCY = Histogram(
    "copilot_rpc_latency_seconds", "Time to serve an RPC (server side, until the handler returns).",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)


# The edge companion has no identity interceptor (Envoy calls it), so its hot RPC counts itself:
# which replica answers how many checks shows how Envoy spreads them.
RATELIMIT_CHECKS = Counter(
    "copilot_ratelimit_checks_total", "Envoy's rate limit checks this edge companion answered, by result.",
    ["result"])


# (method, code) → its series: `labels()` takes a lock and builds the key on every call,
# and this runs on every RPC. Bounded like the labels themselves (methods of the contracts).
_rpc_series: dict[tuple[str, grpc.StatusCode], tuple[Any, Any]] = {}


def observe_rpc(full_method: str, code: grpc.StatusCode, seconds: float) -> None:
    series = _rpc_series.get((full_method, code))
    if series is None:
        service, _, method = full_method.lstrip("/").rpartition("/")
        series = (RPC_REQUESTS.labels(service, method, code.name), RPC_LATENCY.labels(service, method))
        _rpc_series[(full_method, code)] = series
    series[0].inc()
    series[1].observe(seconds)


def serve(host: str, port: int, max_tenants: int = DEFAULT_TENANT_SERIES) -> None:
    """Serves /metrics on host:port from a daemon thread (0 disables), with at most
    `max_tenants` tenants in series of their own."""
    QUOTA_LEVELS.max_series = max_tenants
    if port:
        start_http_server(port, addr=host)
        log.info("metrics", extra={"address": f"{host}:{port}"})


# --- LLM providers ------------------------------------------------------------------------

PROVIDER_LATENCY = Histogram(
    "copilot_provider_latency_seconds",
    "Time of one provider call (a whole streamed answer, a decomposition, the agentic tool rounds),"
    " including the SDK's own retries.", ["provider", "call"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
PROVIDER_ERRORS = Counter(
    "copilot_provider_errors_total",
    "Provider calls that failed after the SDK's retries, by reason.", ["provider", "reason"])
PROVIDER_ERROR_REASONS = ("rate_limited", "timeout", "connection", "server_error", "rejected", "malformed",
                          "other")


def provider_configured(provider: str) -> None:
    """Every reason starts at 0 for a configured provider, so rate() works from the first failure."""
    for reason in PROVIDER_ERROR_REASONS:
        PROVIDER_ERRORS.labels(provider, reason)


# --- Read at scrape time ------------------------------------------------------------------
# Circuit-breaker states and cache counters live in their owners' objects; they are read
# when Prometheus scrapes (on the metrics server's thread), never copied on the hot path.

Families = Callable[[], Iterable[Any]]


class _Sources(Collector):
    def __init__(self) -> None:
        self._sources: dict[str, Callable[[], Families | None]] = {}
        self._readings: dict[str, _Reading] = {}  # held here: the sources only hold weak refs

    def register(self, key: str, owner: object, method: str) -> None:
        """`owner.method()` yields metric families at every scrape while `owner` lives; a
        later registration under the same key replaces it (one owner per process)."""
        ref = weakref.ref(owner)

        def resolve() -> Families | None:
            target = ref()
            return None if target is None else getattr(target, method)

        self._sources[key] = resolve

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge read at scrape time, exported only by the process that registers it (a
        plain Gauge would show 0 in every process that imports this module)."""
        holder = _Reading(name, documentation, read)
        self._readings[name] = holder
        self.register(name, holder, "families")

    def collect(self) -> Iterator[Any]:
        for key, resolve in list(self._sources.items()):
            fn = resolve()
            if fn is None:
                continue
            try:
                yield from fn()
            except Exception:  # a scrape must never fail because one source did
                log.exception("metrics source failed", extra={"source": key})


@dataclass
class _Reading:
    name: str
    documentation: str
    read: Callable[[], float]

    def families(self) -> list[Any]:
        return [GaugeMetricFamily(self.name, self.documentation, value=float(self.read()))]


SOURCES = _Sources()
REGISTRY.register(SOURCES)

# Queue depths, each registered by the process that owns the queue.
USAGE_OUTBOX_DEPTH = ("copilot_usage_outbox_depth",
                      "Entries in generation's local usage outbox not yet acknowledged by metering (a file per "
                      "event, or per group of events written together under load).")
USAGE_LOG_DEPTH = ("copilot_usage_log_depth",
                   "Usage events in metering's durable log, not yet stored in ClickHouse.")

BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}


def breaker_families(states: Iterable[tuple[str, str, str]]) -> list[Any]:
    """copilot_circuit_breaker_state from (provider, scope, state) triples: scope "provider"
    is the shared breaker; scope "tenant" is the worst of that provider's per-tenant
    breakers (tenants are not labels), with how many are open beside it."""
    worst: dict[tuple[str, str], int] = {}
    open_tenants: dict[str, int] = {}
    for provider, scope, state in states:
        value = BREAKER_STATES[state]
        worst[(provider, scope)] = max(worst.get((provider, scope), 0), value)
        if scope == "tenant":
            open_tenants[provider] = open_tenants.get(provider, 0) + (value == BREAKER_STATES["open"])
    state_family = GaugeMetricFamily(
        "copilot_circuit_breaker_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
        labels=["provider", "scope"])
    for (provider, scope), value in sorted(worst.items()):
        state_family.add_metric([provider, scope], value)
    open_family = GaugeMetricFamily(
        "copilot_circuit_breaker_open_tenants", "Per-tenant breakers of a provider that are open.",
        labels=["provider"])
    for provider, count in sorted(open_tenants.items()):
        open_family.add_metric([provider], count)
    return [state_family, open_family]


def cache_families(caches: Iterable[tuple[str, int, int]]) -> list[Any]:
    """copilot_cache_requests_total{cache, result} from (cache, hits, misses)."""
    family = CounterMetricFamily("copilot_cache_requests", "Cache lookups by cache and result (hit/miss).",
                                 labels=["cache", "result"])
    for cache, hits, misses in caches:
        family.add_metric([cache, "hit"], hits)
        family.add_metric([cache, "miss"], misses)
    return [family]


# --- Per-tenant quota levels (bounded) ----------------------------------------------------

@dataclass
class _Level:
    used: int
    limit: int
    resets_at: datetime


class TenantQuotaLevels(Collector):
    """copilot_quota_used_ratio / _used / _limit {tenant, quota}, with bounded cardinality.

    Every observation (a quota check, usage recorded) updates the tenant's level. At a
    scrape the `max_series` tenants nearest a quota (highest used/limit of any quota, ties
    by tenant id) get their own series; all others are folded into tenant="_other", whose
    ratio is the highest among them (an alert on it still fires) and whose used and limit
    are their sums. A level whose window has reset since it was observed reads 0 used.
    """

    def __init__(self, max_series: int = DEFAULT_TENANT_SERIES, max_tracked: int = MAX_TRACKED_TENANTS,
                 clock: Callable[[], datetime] | None = None) -> None:
        self.max_series = max_series
        self.max_tracked = max_tracked
        self._clock = clock or (lambda: datetime.now(UTC))
        self._levels: dict[str, dict[str, _Level]] = {}
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()  # observed on the event loop, read on the scrape thread

    def observe(self, tenant: str, quota: str, used: int, limit: int, resets_at: datetime) -> None:
        with self._lock:
            self._levels.setdefault(tenant, {})[quota] = _Level(used, limit, resets_at)
            self._seen[tenant] = time.monotonic()
            if len(self._levels) > self.max_tracked:
                oldest = min(self._seen, key=self._seen.__getitem__)
                self._levels.pop(oldest, None)
                self._seen.pop(oldest, None)

    def forget(self, tenant: str) -> None:
        with self._lock:
            self._levels.pop(tenant, None)
            self._seen.pop(tenant, None)

    def series(self) -> dict[str, dict[str, tuple[int, int, float]]]:
        """tenant (or "other") → quota → (used, limit, ratio), as a scrape sees it."""
        now = self._clock()
        with self._lock:
            levels = {t: dict(q) for t, q in self._levels.items()}
        current: dict[str, dict[str, tuple[int, int, float]]] = {}
        for tenant, quotas in levels.items():
            current[tenant] = {}
            for quota, level in quotas.items():
                used = 0 if now >= level.resets_at else level.used
                ratio = used / level.limit if level.limit > 0 else 0.0
                current[tenant][quota] = (used, level.limit, ratio)
        ranked = sorted(current, key=lambda t: (-max((v[2] for v in current[t].values()), default=0.0), t))
        out = {t: current[t] for t in ranked[:self.max_series]}
        folded = ranked[self.max_series:]
        if folded:
            other: dict[str, tuple[int, int, float]] = {}
            for tenant in folded:
                for quota, (used, limit, ratio) in current[tenant].items():
                    u, lim, r = other.get(quota, (0, 0, 0.0))
                    other[quota] = (u + used, lim + limit, max(r, ratio))
            out[OTHER_TENANT] = other
        return out

    def collect(self) -> Iterator[Any]:
        ratio = GaugeMetricFamily("copilot_quota_used_ratio", "Share of a quota used in its current window "
                                  f"(top {self.max_series} tenants; the rest as tenant=\"_other\", their highest).",
                                  labels=["tenant", "quota"])
        used = GaugeMetricFamily("copilot_quota_used", "Usage counted against a quota in its current window "
                                 "(tenant=\"_other\": the sum of the folded tenants).", labels=["tenant", "quota"])
        limit = GaugeMetricFamily("copilot_quota_limit", "A quota's limit (tenant=\"_other\": the sum).",
                                  labels=["tenant", "quota"])
        for tenant, quotas in self.series().items():
            for quota, (u, lim, r) in sorted(quotas.items()):
                ratio.add_metric([tenant, quota], r)
                used.add_metric([tenant, quota], u)
                limit.add_metric([tenant, quota], lim)
        yield from (ratio, used, limit)


QUOTA_LEVELS = TenantQuotaLevels()
REGISTRY.register(QUOTA_LEVELS)


def max_tenant_series() -> int:
    """Tenants with a series of their own in any per-tenant metric (COPILOT_METRICS_MAX_TENANTS,
    once `serve` has run); the rest are folded into tenant="_other"."""
    return QUOTA_LEVELS.max_series
