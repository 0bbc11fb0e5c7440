"""Retries with exponential backoff and full jitter: the one way this tree retries.

`Backoff` is the policy: the n-th wait is drawn uniformly from [0, min(cap, base * 2**(n-1)))
(full jitter, so clients that failed together do not come back together), and attempts are
bounded by a count and/or a total time. `retry` (async) and `retry_sync` (for blocking
code already running in a worker thread, e.g. the Stripe SDK) run a call under a policy:

* only what `retryable` accepts is retried; anything else is raised at once;
* a peer's `google.rpc.RetryInfo` (or another `hint`, e.g. HTTP Retry-After) is honoured:
  the wait is at least the delay it asks for;
* the served call's deadline is respected (`interceptors.remaining_deadline()`): a wait
  that would end past it is not started, the last error is raised instead, since the
  retried call could not finish in time anyway. The same goes for the policy's total time.

Background loops that never give up (a watch reconnecting, an outbox redelivering) use
`Backoff.delay` for their waits, with their own failure count.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from google.rpc import error_details_pb2

from servers.common.errors import from_rpc_error
from servers.common.interceptors import remaining_deadline

log = logging.getLogger("copilot.retry")

T = TypeVar("T")

# A delay (seconds) an error asks the caller to wait before retrying, or None.
Hint = Callable[[BaseException], float | None]
# Told about each retry: the error, the attempt that failed (1-based) and the wait.
OnRetry = Callable[[BaseException, int, float], None]

# What a peer restarting or slow looks like (not a refusal): the usual retryable codes.
TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass(frozen=True)
class Backoff:
    """A retry policy: exponential backoff with full jitter, a cap, and bounds.

    `max_attempts` counts every call, the first included (None: no bound); `total_s`
    bounds the time from the first call to the start of the last (None: no bound). A
    policy with neither bound retries until the call succeeds or a deadline ends it."""

    base_s: float = 0.1
    cap_s: float = 5.0
    max_attempts: int | None = None
    total_s: float | None = None
    # Seeded in tests; shared by every user of the policy otherwise.
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.base_s < 0 or self.cap_s < 0:
            raise ValueError("backoff delays must not be negative")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts counts the first call: at least 1")

    def ceiling(self, failures: int) -> float:
        """The largest wait after `failures` consecutive failures (1 or more)."""
        exponent = min(max(failures, 1) - 1, 62)  # 2**62 * base overflows no float; the cap rules anyway
        return min(self.cap_s, self.base_s * 2.0 ** exponent)

    def delay(self, failures: int) -> float:
        """The wait after `failures` consecutive failures (1 or more): full jitter."""
        return self.rng.uniform(0.0, self.ceiling(failures))


def transient(codes: Collection[grpc.StatusCode] = TRANSIENT_CODES) -> Callable[[BaseException], bool]:
    """A `retryable` predicate: gRPC errors with one of `codes`."""

    def retryable(exc: BaseException) -> bool:
        return isinstance(exc, grpc.RpcError) and hasattr(exc, "code") and exc.code() in codes

    return retryable


# The default `retryable`: a peer restarting or slow.
is_transient = transient()


def retry_info_delay(exc: BaseException) -> float | None:
    """The delay a peer's `google.rpc.RetryInfo` asks for, if its error carries one."""
    if not isinstance(exc, grpc.RpcError):
        return None
    try:
        _, _, details = from_rpc_error(exc)
    except Exception:  # undecodable details: no hint, the backoff applies
        return None
    delays = [d.retry_delay.ToTimedelta().total_seconds()
              for d in details if isinstance(d, error_details_pb2.RetryInfo)]
    return max(delays) if delays else None


class _Schedule:
    """The decisions one run of retries makes, shared by the async and the sync loop."""

    def __init__(self, policy: Backoff, retryable: Callable[[BaseException], bool], hint: Hint | None,
                 on_retry: OnRetry | None) -> None:
        self._policy = policy
        self._retryable = retryable
        self._hint = hint
        self._on_retry = on_retry
        self._started = time.monotonic()
        self.failures = 0

    def wait_after(self, exc: BaseException) -> float | None:
        """How long to wait before the next attempt, or None: raise `exc`."""
        self.failures += 1
        policy = self._policy
        if not self._retryable(exc):
            return None
        if policy.max_attempts is not None and self.failures >= policy.max_attempts:
            return None
        delay = policy.delay(self.failures)
        asked = self._hint(exc) if self._hint is not None else None
        if asked is not None:
            delay = max(delay, asked)
        if policy.total_s is not None and time.monotonic() - self._started + delay > policy.total_s:
            return None
        remaining = remaining_deadline()
        if remaining is not None and delay >= remaining:
            return None
        if self._on_retry is not None:
            self._on_retry(exc, self.failures, delay)
        return delay


async def retry(call: Callable[[], Awaitable[T]], policy: Backoff, *,
                retryable: Callable[[BaseException], bool] = is_transient,
                hint: Hint | None = retry_info_delay, on_retry: OnRetry | None = None) -> T:
    """`await call()` until it succeeds, retrying under `policy` what `retryable` accepts;
    the last error is raised when the policy, the deadline or `retryable` says stop."""
    schedule = _Schedule(policy, retryable, hint, on_retry)
    while True:
        try:
            return await call()
        except Exception as exc:
            delay = schedule.wait_after(exc)
            if delay is None:
                raise
        await asyncio.sleep(delay)


def retry_sync(call: Callable[[], T], policy: Backoff, *,
               retryable: Callable[[BaseException], bool] = is_transient,
               hint: Hint | None = retry_info_delay, on_retry: OnRetry | None = None) -> T:
    """`retry` for blocking code: only ever run it off the event loop (in a worker thread)."""
    schedule = _Schedule(policy, retryable, hint, on_retry)
    while True:
        try:
            return call()
        except Exception as exc:
            delay = schedule.wait_after(exc)
            if delay is None:
                raise
        time.sleep(delay)
