"""The Redis-backed limiter: the same fixed windows, shared by every edge instance.

One pipeline (one round trip) per request: INCRBY and EXPIRE NX for each window key.
Keys carry the window's index, so a window's count simply expires with it and instances
need no coordination beyond agreeing on the clock. A refused hit is taken back with a
second pipeline, so only admitted requests count (as in the in-process limiter).

Because only admitted hits count, a window that is full stays full until it ends, on
every instance. So once this instance sees a tenant's window full it refuses that tenant
locally until the window ends, without asking Redis: a tenant flooding far past its
limit costs Redis one round trip per instance and window, not one per request.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from servers.edge.limiter import UNLIMITED, Decision, Limiter, LimiterError, Limits, Window, decide

KEY_PREFIX = "copilot:rl"

# Well under Envoy's rate limit timeout, so a slow Redis turns into this service's
# fail-open/closed decision instead of Envoy's timeout.
SOCKET_TIMEOUT_S = 0.1
CONNECT_TIMEOUT_S = 0.25
MAX_CONNECTIONS = 64


class RedisLimiter(Limiter):
    def __init__(self, client: aioredis.Redis, *, prefix: str = KEY_PREFIX) -> None:
        self._redis = client
        self._prefix = prefix
        # key -> (the limits it was full under, when its last full window ends, that window)
        self._full: dict[str, tuple[Limits, float, Window]] = {}

    @classmethod
    def from_url(cls, url: str, *, prefix: str = KEY_PREFIX) -> RedisLimiter:
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=SOCKET_TIMEOUT_S,
            socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=CONNECT_TIMEOUT_S,
            # A retry would outlive Envoy's timeout; the failure mode decides instead.
            retry=Retry(NoBackoff(), 0),
        )
        return cls(aioredis.Redis(connection_pool=pool), prefix=prefix)

    def _key(self, key: str, seconds: int, index: int) -> str:
        # {key} is a Redis Cluster hash tag: a tenant's windows share a slot, so one
        # pipeline never fans out across nodes.
        return f"{self._prefix}:{{{key}}}:{seconds}:{index}"

    async def hit(self, key: str, limits: Limits, hits: int = 1) -> Decision:
        if not limits:
            return UNLIMITED
        now = time.time()
        full = self._full.get(key)
        if full is not None:
            # A plan change mid-window must take effect at once, so the limits must match.
            if full[1] > now and full[0] == limits:
                return Decision(True, full[2], 0, full[1] - now)
            del self._full[key]
        keys = [self._key(key, w.seconds, int(now // w.seconds)) for w in limits]
        try:
            pipe = self._redis.pipeline(transaction=False)
            for window, name in zip(limits, keys, strict=True):
                pipe.incrby(name, hits)
                # Slightly past the window's end, so clock skew between instances
                # never revives an expired window with no expiry.
                pipe.expire(name, window.seconds + 1, nx=True)
            replies = await pipe.execute()
            counts = [int(reply) - hits for reply in replies[0::2]]
            decision = decide(limits, counts, hits, now)
            if decision.over_limit:
                undo = self._redis.pipeline(transaction=False)
                for window, name in zip(limits, keys, strict=True):
                    undo.decrby(name, hits)
                    undo.expire(name, window.seconds + 1, nx=True)
                await undo.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            raise LimiterError(f"redis: {exc}") from exc
        self._remember_full(key, limits, counts, 0 if decision.over_limit else hits, now)
        return decision

    def _remember_full(self, key: str, limits: Limits, counts: list[int], added: int, now: float) -> None:
        until = 0.0
        last: Window | None = None
        for window, count in zip(limits, counts, strict=True):
            if count + added >= window.limit:
                end = now - now % window.seconds + window.seconds
                if end > until:
                    until, last = end, window
        if last is not None:
            self._full[key] = (limits, until, last)

    def prune(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        stale = [key for key, (_, until, _) in self._full.items() if until <= now]
        for key in stale:
            del self._full[key]
        return len(stale)

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def close(self) -> None:
        await self._redis.aclose()
