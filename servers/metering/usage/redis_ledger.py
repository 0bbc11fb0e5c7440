"""The quota ledger in Redis, shared by every metering replica (REDIS_URL).

Redis holds both halves of the admission sum, so one Lua script can check and change them
atomically whatever replica runs it:

* recorded counters per tenant and window: requests of an hour (`req:<hour>`) and tokens of
  a month (`tok:<month>`), each expiring after its window. Every usage event recorded
  through metering moves them once: a per-event marker (`ev:<id>`, kept DEDUP_TTL) makes a
  retried event count once, and the same script drops the hold the event settles, so no
  reader sees both or neither.
* holds: `res` (reservation id -> state, tokens, expiry), `exp` (ids by expiry, so every
  script first drops what lapsed) and `held` (the running sums of live holds).

A counter that is missing (the window's first use, or Redis lost its data) is seeded from
the usage store (`UsageStore.quota_usage`, the store's own counters as before). Seeding is
two steps, since the store cannot be read inside a script: the script that finds the counter
missing sets an `early:` marker and answers "seed me"; settles that find the marker count
into it; the seeding script then sets the counter to the store's figure plus the marker.
An event stored before the store was read and settled after the marker counts twice, never
none: the counter can only err high, by the events in flight during one store read.

Keys carry the tenant as a Redis Cluster hash tag ({tenant}): a script touches one slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from servers.common.errors import Unavailable
from servers.metering.tenants.plans import Limits
from servers.metering.usage.domain import (
    QuotaUsage,
    RecordResult,
    UsageEvent,
    Window,
    hour_window,
    month_window,
)
from servers.metering.usage.ledger import TOMBSTONE_S, Hold, QuotaLedger, Reservation, Write
from servers.metering.usage.store import UsageStore

KEY_PREFIX = "copilot:quota"
# A retried usage event counts once if the retry comes within this long of the first
# recording (the outbox's retries come within minutes); the store deduplicates forever.
DEDUP_TTL = timedelta(days=2)
# Windows' counters outlive their window by this much (clock skew between replicas).
COUNTER_MARGIN = timedelta(hours=1)
# A seeding that takes longer than this (a store read) loses its `early:` marker.
SEED_MARKER_MS = 30_000
SOCKET_TIMEOUT_S = 2.0

_COMMON = """
local function purge(res, exp, held, now)
  local gone = redis.call('ZRANGEBYSCORE', exp, '-inf', now, 'LIMIT', 0, 1000)
  for _, rid in ipairs(gone) do
    local v = redis.call('HGET', res, rid)
    if v then
      local state, tokens = string.match(v, '^(%a) (%d+)')
      if state == 'h' then
        redis.call('HINCRBY', held, 'r', -1)
        redis.call('HINCRBY', held, 'k', '-' .. tokens)
      end
      redis.call('HDEL', res, rid)
    end
    redis.call('ZREM', exp, rid)
  end
end

local function counter(key, seed, ttl)
  local v = redis.call('GET', key)
  if v then return tonumber(v) end
  local early = 'early:' .. key
  if seed == '' then
    redis.call('SET', early, '0', 'NX', 'PX', ARGV[#ARGV])
    return nil
  end
  local extra = redis.call('GET', early) or '0'
  redis.call('SET', key, seed, 'PX', ttl)
  redis.call('INCRBY', key, extra)
  redis.call('DEL', early)
  return tonumber(seed) + tonumber(extra)
end

local function held_sums(held)
  return tonumber(redis.call('HGET', held, 'r') or '0'), tonumber(redis.call('HGET', held, 'k') or '0')
end
"""

# KEYS: res exp held req tok
# ARGV: now_ms rid tokens expire_ms req_limit tok_limit req_seed tok_seed req_ttl_ms tok_ttl_ms keep_ms marker_ms
# rid '' reads usage only. Replies {status, requests used, tokens used, tokens, expire_ms}:
# status -1 seed the counters, 0 refused, 1 held, 2 existing, 3 read.
_ADMIT = _COMMON + """
local now = ARGV[1]
purge(KEYS[1], KEYS[2], KEYS[3], now)
local rec_r = counter(KEYS[4], ARGV[7], ARGV[9])
local rec_k = counter(KEYS[5], ARGV[8], ARGV[10])
if rec_r == nil or rec_k == nil then return {-1} end
local held_r, held_k = held_sums(KEYS[3])
local used_r, used_k = rec_r + held_r, rec_k + held_k
if ARGV[2] == '' then return {3, used_r, used_k, 0, 0} end
local existing = redis.call('HGET', KEYS[1], ARGV[2])
if existing then
  local state, tokens, expire = string.match(existing, '^(%a) (%d+) (%d+)$')
  if state == 'h' then
    used_r, used_k = used_r - 1, used_k - tonumber(tokens)
  end
  return {2, used_r, used_k, tonumber(tokens), tonumber(expire)}
end
if used_r + 1 > tonumber(ARGV[5]) or used_k + tonumber(ARGV[3]) > tonumber(ARGV[6]) then
  return {0, used_r, used_k, tonumber(ARGV[3]), 0}
end
redis.call('HSET', KEYS[1], ARGV[2], 'h ' .. ARGV[3] .. ' ' .. ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[2])
redis.call('HINCRBY', KEYS[3], 'r', 1)
redis.call('HINCRBY', KEYS[3], 'k', ARGV[3])
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[11]) end
return {1, used_r, used_k, tonumber(ARGV[3]), tonumber(ARGV[4])}
"""

# KEYS: res exp held   ARGV: now_ms rid   Reply: 1 if a hold was dropped.
_RELEASE = _COMMON + """
purge(KEYS[1], KEYS[2], KEYS[3], ARGV[1])
local v = redis.call('HGET', KEYS[1], ARGV[2])
if not v then return 0 end
local state, tokens = string.match(v, '^(%a) (%d+)')
if state ~= 'h' then return 0 end
redis.call('HINCRBY', KEYS[3], 'r', -1)
redis.call('HINCRBY', KEYS[3], 'k', '-' .. tokens)
redis.call('HDEL', KEYS[1], ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
"""

# KEYS: res exp held req tok ev
# ARGV: now_ms rid requests tokens dedup_ms tombstone_expire_ms keep_ms
# Reply: 1 if the event was counted now, 0 if it had been.
_SETTLE = _COMMON + """
purge(KEYS[1], KEYS[2], KEYS[3], ARGV[1])
local fresh = redis.call('SET', KEYS[6], '1', 'NX', 'PX', ARGV[5])
if fresh then
  for i, amount in ipairs({ARGV[3], ARGV[4]}) do
    local key = KEYS[3 + i]
    if redis.call('EXISTS', key) == 1 then
      redis.call('INCRBY', key, amount)
    elseif redis.call('EXISTS', 'early:' .. key) == 1 then
      redis.call('INCRBY', 'early:' .. key, amount)
    end
  end
end
if ARGV[2] ~= '' then
  local v = redis.call('HGET', KEYS[1], ARGV[2])
  if v then
    local state, tokens, expire = string.match(v, '^(%a) (%d+) (%d+)$')
    if state == 'h' then
      redis.call('HINCRBY', KEYS[3], 'r', -1)
      redis.call('HINCRBY', KEYS[3], 'k', '-' .. tokens)
      redis.call('HSET', KEYS[1], ARGV[2], 's ' .. tokens .. ' ' .. expire)
    end
  else
    redis.call('HSET', KEYS[1], ARGV[2], 's 0 ' .. ARGV[6])
    redis.call('ZADD', KEYS[2], ARGV[6], ARGV[2])
  end
  for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[7]) end
end
if fresh then return 1 end
return 0
"""


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


class RedisLedger(QuotaLedger):
    def __init__(self, client: aioredis.Redis, store: UsageStore, *, max_ttl: timedelta,
                 prefix: str = KEY_PREFIX) -> None:
        self._redis = client
        self._store = store
        self._prefix = prefix
        # Holds' keys are refreshed on every write and outlive the longest reservation, so a
        # tenant's keys vanish once nothing of it can still be live.
        self._keep_ms = int((max(max_ttl, timedelta(seconds=TOMBSTONE_S)) + COUNTER_MARGIN).total_seconds() * 1000)
        self._admit = client.register_script(_ADMIT)
        self._release = client.register_script(_RELEASE)
        self._settle = client.register_script(_SETTLE)

    @classmethod
    def from_url(cls, url: str, store: UsageStore, *, max_ttl: timedelta, prefix: str = KEY_PREFIX) -> RedisLedger:
        client = aioredis.from_url(url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S)
        return cls(client, store, max_ttl=max_ttl, prefix=prefix)

    async def close(self) -> None:
        await self._redis.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    def _key(self, tenant_id: str, name: str) -> str:
        return f"{self._prefix}:{{{tenant_id}}}:{name}"

    def _hold_keys(self, tenant_id: str) -> list[str]:
        return [self._key(tenant_id, "res"), self._key(tenant_id, "exp"), self._key(tenant_id, "held")]

    def _counter_keys(self, tenant_id: str, hour: Window, month: Window) -> list[str]:
        return [self._key(tenant_id, f"req:{int(hour.start.timestamp())}"),
                self._key(tenant_id, f"tok:{int(month.start.timestamp())}")]

    async def _run_admit(self, tenant_id: str, now: datetime, reservation_id: str = "", tokens: int = 0,
                         expire: datetime | None = None, limits: Limits | None = None) -> list[int]:
        hour, month = hour_window(now), month_window(now)
        keys = self._hold_keys(tenant_id) + self._counter_keys(tenant_id, hour, month)
        ttls = [int((w.end + COUNTER_MARGIN - now).total_seconds() * 1000) for w in (hour, month)]
        seeds = ["", ""]
        for _ in range(2):
            args: list[str | int] = [_ms(now), reservation_id, tokens, _ms(expire or now),
                    limits.requests_per_hour if limits else 0, limits.tokens_per_month if limits else 0,
                    *seeds, *ttls, self._keep_ms, SEED_MARKER_MS]
            try:
                reply = [int(v) for v in await self._admit(keys=keys, args=args)]
            except (RedisError, OSError) as exc:
                raise Unavailable(f"quota ledger (Redis) unavailable: {exc}", reason="QUOTA_LEDGER_UNAVAILABLE") \
                    from exc
            if reply[0] != -1:
                return reply
            recorded = await self._store.quota_usage(tenant_id, hour, month)
            seeds = [str(recorded.requests_in_hour), str(recorded.tokens_in_month)]
        raise Unavailable("quota ledger (Redis) could not be seeded", reason="QUOTA_LEDGER_UNAVAILABLE")

    async def usage(self, tenant_id: str, now: datetime) -> QuotaUsage:
        reply = await self._run_admit(tenant_id, now)
        return QuotaUsage(requests_in_hour=reply[1], tokens_in_month=reply[2])

    async def reserve(self, tenant_id: str, limits: Limits, reservation_id: str, tokens: int, ttl: timedelta,
                      now: datetime) -> Hold:
        status, used_r, used_k, held, expire_ms = await self._run_admit(
            tenant_id, now, reservation_id, tokens, now + ttl, limits)
        usage = QuotaUsage(requests_in_hour=used_r, tokens_in_month=used_k)
        if status == 0:
            return Hold(usage, None)
        expire = datetime.fromtimestamp(expire_ms / 1000, tz=now.tzinfo)
        return Hold(usage, Reservation(reservation_id, held, expire), existing=status == 2)

    async def release(self, tenant_id: str, reservation_id: str, now: datetime) -> bool:
        try:
            return bool(await self._release(keys=self._hold_keys(tenant_id), args=[_ms(now), reservation_id]))
        except (RedisError, OSError) as exc:
            raise Unavailable(f"quota ledger (Redis) unavailable: {exc}", reason="QUOTA_LEDGER_UNAVAILABLE") from exc

    async def record(self, events: Sequence[UsageEvent], write: Write, now: datetime) -> RecordResult:
        # Stored first: a counter seeded from the store in between then errs high, not low.
        result = await write(events)
        tombstone = _ms(now + timedelta(seconds=TOMBSTONE_S))
        dedup_ms = int(DEDUP_TTL.total_seconds() * 1000)
        try:
            pipe = self._redis.pipeline(transaction=False)
            for e in events:
                keys = (self._hold_keys(e.tenant_id)
                        + self._counter_keys(e.tenant_id, hour_window(e.occur_time), month_window(e.occur_time))
                        + [self._key(e.tenant_id, f"ev:{e.event_id}")])
                await self._settle(keys=keys, args=[_ms(now), e.reservation_id, e.requests, e.tokens, dedup_ms,
                                                    tombstone, self._keep_ms], client=pipe)
            await pipe.execute()
        except (RedisError, OSError) as exc:
            # Stored but not counted in Redis: the caller retries (the store deduplicates,
            # and the retry counts it here once).
            raise Unavailable(f"usage stored, quota ledger (Redis) not updated; retry: {exc}",
                              reason="QUOTA_LEDGER_UNAVAILABLE") from exc
        return result
