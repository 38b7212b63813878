"""Host-RAM LRU of decoded adapter weights, bounded by bytes.

The tier between the device slot pool and Redis: decoded adapters (tensors on the host)
keyed by something immutable (the content sha256 of their weights), evicted least recently
used first once the sum of entry sizes would pass ``max_bytes``. Counters are plain
attributes and a :meth:`HostCache.stats` snapshot; the server exports them to Prometheus
(nothing here touches a global registry).

Thread-safe: every structure change happens under one lock, so request handlers, loader
threads and the event loop may share a cache. :meth:`HostCache.get_or_load` coalesces
concurrent asyncio loads of one key: one loader runs, every concurrent caller awaits its
result; a failed load fails exactly the callers that waited on it and caches nothing.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True)
class CacheStats:
    """A consistent snapshot of a :class:`HostCache`'s counters and occupancy."""

    hits: int
    misses: int
    evictions: int
    oversize: int          # entries refused because one alone is larger than the budget
    loads: int             # loader calls started by get_or_load
    load_failures: int
    coalesced: int         # get_or_load callers that joined a load already in flight
    entries: int
    bytes: int
    max_bytes: int


class HostCache(Generic[K, V]):
    """LRU mapping ``K -> V`` whose total ``size_of(value)`` stays ``<= max_bytes``."""

    def __init__(self, max_bytes: int, size_of: Callable[[V], int]) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._lock = threading.RLock()
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        # key -> the load task in flight for it (each task belongs to one event loop)
        self._inflight: dict[K, asyncio.Task[V]] = {}
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.oversize = 0
        self.loads = 0
        self.load_failures = 0
        self.coalesced = 0

    # --- plain mapping operations ----------------------------------------------------------
    def get(self, key: K) -> V | None:
        """The cached value (now most recently used), or None; counts a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def peek(self, key: K) -> V | None:
        """The cached value without touching recency or counters."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry[0]

    def put(self, key: K, value: V) -> bool:
        """Insert or replace; evict LRU entries to fit. Returns False (and counts it under
        ``oversize``) when the value alone is larger than the budget: it is not cached and
        any older value under ``key`` is dropped."""
        size = int(self._size_of(value))
        if size < 0:
            raise ValueError(f"size_of returned {size} for {key!r}")
        with self._lock:
            self._remove(key)
            if size > self.max_bytes:
                self.oversize += 1
                log.info("host cache: entry larger than the budget, not cached",
                         extra={"key": repr(key), "bytes": size, "max_bytes": self.max_bytes})
                return False
            self._entries[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                old_key, (_, old_size) = self._entries.popitem(last=False)
                self._bytes -= old_size
                self.evictions += 1
                log.debug("host cache: evicted", extra={"key": repr(old_key),
                                                        "bytes": old_size})
            return True

    def pop(self, key: K) -> V | None:
        """Remove ``key`` (and forget a load in flight for it: its result won't be cached)."""
        with self._lock:
            self._inflight.pop(key, None)
            entry = self._remove(key)
            return None if entry is None else entry[0]

    def clear(self) -> None:
        """Drop every entry and forget loads in flight (counters are kept)."""
        with self._lock:
            self._entries.clear()
            self._inflight.clear()
            self._bytes = 0

    def _remove(self, key: K) -> tuple[V, int] | None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[1]
        return entry

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes

    def ordered_keys(self) -> list[K]:
        """Keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(hits=self.hits, misses=self.misses, evictions=self.evictions,
                              oversize=self.oversize, loads=self.loads,
                              load_failures=self.load_failures, coalesced=self.coalesced,
                              entries=len(self._entries), bytes=self._bytes,
                              max_bytes=self.max_bytes)

    # --- coalesced asyncio loading -----------------------------------------------------------
    async def get_or_load(self, key: K, loader: Callable[[], Awaitable[V]]) -> V:
        """The cached value, or the result of ``loader()`` (then cached if it fits).

        Concurrent callers for one key on one event loop share a single ``loader()`` call.
        The load runs as its own task: a caller that is cancelled stops waiting but does not
        cancel the load the others wait on. A loader exception reaches every caller that
        waited on that load, nothing is cached, and the next call loads again.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[0]
            self.misses += 1
            task = self._inflight.get(key)
            if task is not None and task.get_loop() is loop and not task.done():
                self.coalesced += 1
            else:
                self.loads += 1
                task = loop.create_task(self._load(key, loader))
                task.add_done_callback(_retrieve_exception)
                self._inflight[key] = task
        return await asyncio.shield(task)

    async def _load(self, key: K, loader: Callable[[], Awaitable[V]]) -> V:
        this = asyncio.current_task()
        try:
            value = await loader()
        except BaseException:
            with self._lock:
                self.load_failures += 1
                if self._inflight.get(key) is this:
                    del self._inflight[key]
            raise
        with self._lock:
            # pop()/clear() during the load mean "this may be stale": hand the value to the
            # waiters but do not cache it.
            if self._inflight.get(key) is this:
                del self._inflight[key]
                self.put(key, value)
        return value


def _retrieve_exception(task: asyncio.Task[object]) -> None:
    """Mark a failed load's exception as retrieved even when every waiter was cancelled."""
    if not task.cancelled():
        task.exception()
