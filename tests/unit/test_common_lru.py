"""The one LRU (servers/common/lru.py)."""

from __future__ import annotations

from servers.common.lru import LruCache


def test_the_least_recently_used_entry_goes_first_and_reads_refresh() -> None:
    evicted: list[tuple[str, int]] = []
    cache: LruCache[str, int] = LruCache(2, on_evict=lambda key, value: evicted.append((key, value)))
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3)
    assert evicted == [("b", 2)]
    assert cache.snapshot() == ["a", "c"]
    # A peek neither refreshes nor counts.
    assert cache.peek("a") == 1
    cache.put("d", 4)
    assert evicted == [("b", 2), ("a", 1)]
    assert (cache.hits, cache.misses) == (1, 0)
    assert cache.get("b") is None and cache.misses == 1
    assert "c" in cache and len(cache) == 2


def test_what_the_caller_takes_out_is_not_reported_as_evicted() -> None:
    evicted: list[str] = []
    cache: LruCache[tuple[str, int], str] = LruCache(10, on_evict=lambda key, _value: evicted.append(key[0]))
    for tenant in ("acme", "globex"):
        for month in range(3):
            cache.put((tenant, month), f"{tenant}-{month}")
    assert cache.pop(("acme", 0)) == "acme-0" and cache.pop(("acme", 0)) is None
    assert cache.drop(lambda key: key[0] == "acme") == 2
    assert cache.clear() == ["globex-0", "globex-1", "globex-2"]
    assert len(cache) == 0 and evicted == []


def test_a_cache_of_no_capacity_keeps_nothing() -> None:
    cache: LruCache[str, int] = LruCache(0)
    cache.put("a", 1)
    assert cache.get("a") is None and len(cache) == 0
