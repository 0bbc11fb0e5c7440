"""Requests whose bytes are not a valid message: refused as INVALID_ARGUMENT, not UNKNOWN.

grpc.aio decodes a unary request before any interceptor's handler runs; when the method's
`request_deserializer` raises, grpc answers UNKNOWN ("Unexpected <class DecodeError>...")
and logs a traceback at error level, so a few bytes of garbage turn into a kilobyte of
error log and a status clients read as "the server broke". The server interceptors swap
each method's deserializer for a tolerant one (`tolerant_deserializer`): on a valid
message it returns what the original returns (one extra call and an isinstance check on
the hot path); on invalid bytes it returns, for a unary request, the refusal itself
(`MalformedRequest`, which the wrapped behaviour sees instead of a request and sends); for
a stream's messages it raises it from the servicer's `async for`, where the interceptor's
error handling turns it into the status like any domain error.

Every refusal is counted in `copilot_malformed_requests_total{service, rpc}` and logged
at WARNING without a traceback or any of the bytes, at most once per tenant per interval
(`MalformedReport`), with how many were left out since the last line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from google.protobuf import descriptor_pool
from prometheus_client import Counter

from servers.common.errors import MalformedRequest
from servers.common.lru import LruCache

log = logging.getLogger("copilot.malformed")

MALFORMED_REQUESTS = Counter(
    "copilot_malformed_requests_total",
    "Requests and stream messages refused because their bytes are not a valid message.", ["service", "rpc"])

# Who sent it when no verified identity is known (public RPCs, the edge's companion).
ANONYMOUS = "-"

Deserializer = Callable[[bytes], Any]


def request_type(method: str, deserializer: Deserializer) -> str:
    """The full name of the message `deserializer` decodes for `method` (for the refusal)."""
    owner = getattr(deserializer, "__self__", None)  # `Message.FromString` is a bound classmethod
    descriptor = getattr(owner, "DESCRIPTOR", None)
    if descriptor is not None and hasattr(descriptor, "full_name"):
        return str(descriptor.full_name)
    service, _, name = method.lstrip("/").rpartition("/")
    try:
        return str(descriptor_pool.Default().FindServiceByName(service).FindMethodByName(name).input_type.full_name)
    except (KeyError, AttributeError):
        return "request message"


def tolerant_deserializer(method: str, deserializer: Deserializer, *, streaming: bool) -> Deserializer:
    """`deserializer`, except that bytes it cannot decode give a `MalformedRequest`: returned
    for a unary request (grpc would refuse a raising one as UNKNOWN before any handler runs),
    raised for a stream's message (into the servicer's iteration)."""
    type_name = request_type(method, deserializer)

    if streaming:
        def decode_message(raw: bytes) -> Any:
            try:
                return deserializer(raw)
            except Exception:  # whatever the decoder raises, the bytes are not a valid message
                raise MalformedRequest(type_name, len(raw)) from None

        return decode_message

    def decode_request(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception:
            return MalformedRequest(type_name, len(raw))

    return decode_request


class LogLimiter:
    """At most one log line per key per `interval_s`; says how many were left out meanwhile.

    Keys are tenants: a tenant sending garbage in a loop writes one line per interval, not
    one per request, and cannot push another tenant's lines out. At most `max_keys` keys are
    remembered (the least recently logged forgotten first), so memory stays bounded whatever
    the tenant ids.
    """

    def __init__(self, interval_s: float, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._clock = clock
        self._suppressed: dict[str, int] = {}
        # A key forgotten takes its count of left-out lines with it.
        self._last: LruCache[str, float] = LruCache(
            max_keys, on_evict=lambda forgotten, _at: self._suppressed.pop(forgotten, None))

    def admit(self, key: str) -> int | None:
        """None when this event is left out of the log; else how many were left out since the
        key's last line (0 for its first)."""
        now = self._clock()
        last = self._last.peek(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last.put(key, now)
        return self._suppressed.pop(key, 0)


class MalformedReport:
    """Counts each malformed request and logs it within the per-tenant limit."""

    def __init__(self, log_interval_s: float) -> None:
        self._limiter = LogLimiter(log_interval_s)

    def __call__(self, method: str, tenant: str | None, refusal: MalformedRequest) -> None:
        service, _, rpc = method.lstrip("/").rpartition("/")
        MALFORMED_REQUESTS.labels(service, rpc).inc()
        suppressed = self._limiter.admit(tenant or ANONYMOUS)
        if suppressed is None:
            return
        # The bytes themselves never reach the log: only their type and size.
        log.warning("malformed request refused", extra={
            "rpc": method, "tenant": tenant, "message_type": refusal.type_name, "bytes": refusal.size,
            "suppressed": suppressed, "log_interval_s": self._limiter.interval_s})
