"""HostCache: byte-bounded LRU, counters, oversize entries, coalesced asyncio loads."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tessera.store.cache import HostCache


def blob_cache(max_bytes: int) -> HostCache[str, bytes]:
    return HostCache(max_bytes, len)


def test_lru_keeps_total_bytes_within_budget_and_evicts_least_recent() -> None:
    cache = blob_cache(100)
    assert cache.put("a", b"x" * 40)
    assert cache.put("b", b"x" * 40)
    assert cache.get("a") == b"x" * 40          # a is now more recent than b
    assert cache.put("c", b"x" * 40)            # 120 > 100: evict LRU = b
    assert "b" not in cache
    assert cache.ordered_keys() == ["a", "c"]
    assert cache.bytes == 80
    st = cache.stats()
    assert (st.hits, st.misses, st.evictions, st.entries, st.bytes) == (1, 0, 1, 2, 80)
    assert cache.get("b") is None
    assert cache.stats().misses == 1


def test_one_large_entry_evicts_several_small_ones() -> None:
    cache = blob_cache(100)
    for name in "abcde":
        cache.put(name, b"x" * 20)
    assert cache.bytes == 100
    cache.put("big", b"y" * 70)                 # needs 70: evicts a, b, c, d (80 bytes)
    assert cache.ordered_keys() == ["e", "big"]
    assert cache.bytes == 90
    assert cache.evictions == 4


def test_replacing_a_key_accounts_its_old_size() -> None:
    cache = blob_cache(100)
    cache.put("a", b"x" * 60)
    cache.put("a", b"x" * 30)
    assert cache.bytes == 30
    assert len(cache) == 1
    assert cache.evictions == 0


def test_oversize_entry_is_not_cached_and_is_counted() -> None:
    cache = blob_cache(100)
    cache.put("small", b"x" * 10)
    assert cache.put("huge", b"x" * 101) is False
    assert "huge" not in cache
    assert cache.ordered_keys() == ["small"]            # nothing was evicted to make room
    st = cache.stats()
    assert (st.oversize, st.evictions, st.bytes) == (1, 0, 10)


def test_pop_and_clear() -> None:
    cache = blob_cache(100)
    cache.put("a", b"1")
    cache.put("b", b"22")
    assert cache.pop("a") == b"1"
    assert cache.pop("a") is None
    assert cache.bytes == 2
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0


def test_threads_never_push_it_over_budget() -> None:
    cache = blob_cache(1000)
    errors: list[str] = []

    def worker(seed: int) -> None:
        for i in range(2000):
            key = f"k{(seed * 7919 + i) % 97}"
            if i % 3:
                cache.put(key, b"x" * (1 + (i * seed) % 150))
            else:
                cache.get(key)
            if cache.bytes > 1000:
                errors.append(f"over budget: {cache.bytes}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert cache.bytes == sum(len(cache.peek(k) or b"") for k in cache.ordered_keys())


async def test_concurrent_get_or_load_runs_one_load() -> None:
    cache = blob_cache(100)
    release = asyncio.Event()
    calls = 0

    async def loader() -> bytes:
        nonlocal calls
        calls += 1
        await release.wait()
        return b"value"

    waiters = [asyncio.create_task(cache.get_or_load("k", loader)) for _ in range(10)]
    await asyncio.sleep(0)                      # let every waiter register
    release.set()
    assert await asyncio.gather(*waiters) == [b"value"] * 10
    assert calls == 1
    st = cache.stats()
    assert (st.loads, st.coalesced, st.misses) == (1, 9, 10)
    assert await cache.get_or_load("k", loader) == b"value"   # now a hit, no load
    assert calls == 1
    assert cache.stats().hits == 1


async def test_failed_load_fails_its_waiters_only_and_is_not_cached() -> None:
    cache = blob_cache(100)
    release = asyncio.Event()
    attempts = 0

    async def flaky() -> bytes:
        nonlocal attempts
        attempts += 1
        await release.wait()
        if attempts == 1:
            raise RuntimeError("blob fetch failed")
        return b"ok"

    async def other() -> bytes:
        return b"other"

    waiters = [asyncio.create_task(cache.get_or_load("k", flaky)) for _ in range(3)]
    bystander = asyncio.create_task(cache.get_or_load("j", other))
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert await bystander == b"other"          # a different key is unaffected
    assert "k" not in cache
    assert cache.stats().load_failures == 1
    assert await cache.get_or_load("k", flaky) == b"ok"   # the next call loads again
    assert attempts == 2
    assert cache.peek("k") == b"ok"


async def test_cancelled_waiter_does_not_cancel_the_shared_load() -> None:
    cache = blob_cache(100)
    release = asyncio.Event()

    async def loader() -> bytes:
        await release.wait()
        return b"v"

    first = asyncio.create_task(cache.get_or_load("k", loader))
    second = asyncio.create_task(cache.get_or_load("k", loader))
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    release.set()
    assert await second == b"v"
    assert cache.peek("k") == b"v"


async def test_pop_during_load_returns_value_but_does_not_cache_it() -> None:
    cache = blob_cache(100)
    release = asyncio.Event()

    async def loader() -> bytes:
        await release.wait()
        return b"stale?"

    waiter = asyncio.create_task(cache.get_or_load("k", loader))
    await asyncio.sleep(0)
    cache.pop("k")                               # invalidated while loading
    release.set()
    assert await waiter == b"stale?"
    assert "k" not in cache


async def test_oversize_loaded_value_is_returned_but_not_cached() -> None:
    cache = blob_cache(4)

    async def loader() -> bytes:
        return b"too large"

    assert await cache.get_or_load("k", loader) == b"too large"
    assert "k" not in cache
    assert cache.stats().oversize == 1
