"""Device slot manager: which adapter (by immutable key) sits in which slot of a SlotPool.

- Residency: ``key -> slot``; LRU eviction among *unpinned* slots. A slot is pinned
  (refcounted) while any running row uses it, so a running row's adapter never changes.
- Loading happens off the forward loop: the request's async loader fetches the
  ``Adapter`` (host cache / Redis / HyperLoader generation: the server's business), then
  ``pool.prepare`` validates and lowers it in a worker thread. Only ``pool.write`` (a copy
  into the slot's preallocated rows) runs between forward steps, in the forward thread.
- Concurrent requests for one cold key share one load. A failed load (loader exception,
  validation error, out of memory) fails the requests waiting for that key only and is not
  remembered: the next request retries.
- A prepared adapter that finds every slot pinned reserves the least recently used one;
  no new rows join that slot until its running rows finish, so a cold adapter cannot
  starve behind hot ones.

All methods except the load task's worker-thread part run on the event loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from tessera.adapters import Adapter, PreparedAdapter, SlotPool
from tessera.engine.errors import AdapterLoadError

log = logging.getLogger(__name__)

AdapterLoader = Callable[[], Awaitable[Adapter]]


@dataclass
class SlotStats:
    hits: int = 0  # requests whose adapter was resident (or already being written)
    misses: int = 0  # requests that had to wait for a load (shared loads count each)
    loads: int = 0  # loads started (one per cold key, however many requests share it)
    load_failures: int = 0
    evictions: int = 0  # resident adapters replaced by another
    load_seconds_total: float = 0.0
    last_load_seconds: float = 0.0
    load_seconds: list[float] = field(default_factory=list)  # recent, bounded (metrics)


@dataclass
class _Resident:
    key: str
    slot: int
    pins: int = 0
    method: str = ""


@dataclass
class Write:
    """A slot write the forward thread performs before its next forward."""

    key: str
    slot: int
    prepared: PreparedAdapter


class SlotManager:
    RECENT_LOADS = 256

    def __init__(self, pool: SlotPool, executor: Executor,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.pool = pool
        self.executor = executor
        self.on_change = on_change  # wakes the scheduler when a load finishes
        self.stats = SlotStats()
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # LRU first
        self._by_slot: dict[int, _Resident] = {}
        self._free: list[int] = list(range(pool.num_slots))[::-1]
        self._loading: dict[str, asyncio.Future[PreparedAdapter]] = {}
        self._ready: dict[str, PreparedAdapter] = {}  # prepared, waiting for a slot
        self._reserved: dict[int, str] = {}  # slot -> key waiting for it to drain
        self._writes: list[Write] = []
        self._tasks: set[asyncio.Task[None]] = set()

    # --- requests ---------------------------------------------------------------------
    def request(self, key: str, loader: AdapterLoader, *, count: bool = True) -> None:
        """A request needs ``key``: count hit/miss and start its load when cold."""
        if key in self._resident:
            self.stats.hits += count
            return
        self.stats.misses += count
        if key in self._loading or key in self._ready:
            return
        future: asyncio.Future[PreparedAdapter] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        self.stats.loads += 1
        task = asyncio.create_task(self._load(key, loader, future), name=f"load {key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def failure(self, key: str) -> AdapterLoadError | None:
        """The error of ``key``'s finished, failed load (None while loading or when fine)."""
        future = self._loading.get(key)
        if future is None or not future.done():
            return None
        error = future.exception()
        assert error is not None  # a successful load leaves _loading at once
        return error if isinstance(error, AdapterLoadError) else AdapterLoadError(key, error)

    def forget_failure(self, key: str) -> None:
        """Called once every waiting request saw the failure: the next request retries."""
        future = self._loading.get(key)
        if future is not None and future.done():
            del self._loading[key]

    def acquire(self, key: str) -> int | None:
        """Pin ``key``'s slot for a new row; None while it is not (yet) placeable."""
        resident = self._resident.get(key)
        if resident is not None:
            if resident.slot in self._reserved:
                return None  # draining for a waiting cold adapter
            resident.pins += 1
            self._resident.move_to_end(key)
            return resident.slot
        prepared = self._ready.get(key)
        if prepared is None:
            return None
        slot = self._take_slot(key)
        if slot is None:
            return None
        del self._ready[key]
        entry = _Resident(key, slot, pins=1, method="+".join(prepared.adapter.methods))
        self._resident[key] = entry
        self._by_slot[slot] = entry
        self._writes.append(Write(key, slot, prepared))
        return slot

    def release(self, key: str) -> None:
        resident = self._resident.get(key)
        if resident is None or resident.pins <= 0:
            return
        resident.pins -= 1
        if resident.pins == 0 and resident.slot in self._reserved:
            self.on_change()  # a reserved slot drained: the waiting adapter can go in

    def pins(self, key: str) -> int:
        resident = self._resident.get(key)
        return 0 if resident is None else resident.pins

    def slot_of(self, key: str) -> int | None:
        resident = self._resident.get(key)
        return None if resident is None else resident.slot

    def method_of(self, key: str) -> str:
        resident = self._resident.get(key)
        return "" if resident is None else resident.method

    def drop_unneeded(self, needed: set[str]) -> None:
        """Forget prepared adapters (and reservations) no waiting request needs anymore."""
        for key in [k for k in self._ready if k not in needed]:
            del self._ready[key]
        for slot, key in list(self._reserved.items()):
            if key not in needed:
                del self._reserved[slot]

    # --- the forward thread's part ----------------------------------------------------
    def take_writes(self) -> list[Write]:
        writes, self._writes = self._writes, []
        return writes

    def write_failed(self, write: Write) -> None:
        """``pool.write`` raised (it leaves the slot empty): unmap the key, free the slot."""
        entry = self._resident.pop(write.key, None)
        if entry is not None:
            self._by_slot.pop(entry.slot, None)
            self._free.append(entry.slot)
        self.stats.load_failures += 1

    @property
    def pending_writes(self) -> bool:
        return bool(self._writes)

    @property
    def resident_keys(self) -> list[str]:
        return list(self._resident)

    # --- internals --------------------------------------------------------------------
    def _take_slot(self, key: str) -> int | None:
        for slot, waiting in list(self._reserved.items()):
            if waiting == key:
                victim = self._by_slot.get(slot)
                if victim is not None and victim.pins > 0:
                    return None  # still draining
                del self._reserved[slot]
                if victim is not None:
                    self._evict(victim)
                    return slot
                break
        if self._free:
            return self._free.pop()
        for entry in self._resident.values():  # least recently used first
            if entry.pins == 0 and entry.slot not in self._reserved:
                self._evict(entry)
                return entry.slot
        if key not in self._reserved.values():
            for entry in self._resident.values():  # every slot pinned: reserve the LRU
                if entry.slot not in self._reserved:
                    self._reserved[entry.slot] = key
                    break
        return None

    def _evict(self, entry: _Resident) -> None:
        del self._resident[entry.key]
        del self._by_slot[entry.slot]
        self.stats.evictions += 1
        log.debug("adapter evicted", extra={"adapter": entry.key, "slot": entry.slot})

    async def _load(self, key: str, loader: AdapterLoader,
                    future: asyncio.Future[PreparedAdapter]) -> None:
        start = time.perf_counter()
        try:
            adapter = await loader()
            if not isinstance(adapter, Adapter):
                raise TypeError(f"the loader returned {type(adapter).__name__}, not Adapter")
            loop = asyncio.get_running_loop()
            prepared = await loop.run_in_executor(self.executor, self.pool.prepare, adapter)
        except Exception as exc:  # any loader failure fails only this key's requests
            self.stats.load_failures += 1
            log.warning("adapter load failed", extra={"adapter": key, "error": repr(exc)})
            future.set_exception(AdapterLoadError(key, exc))
            future.exception()  # retrieved: waiting requests read it through failure()
        else:
            seconds = time.perf_counter() - start
            self.stats.load_seconds_total += seconds
            self.stats.last_load_seconds = seconds
            self.stats.load_seconds.append(seconds)
            del self.stats.load_seconds[:-self.RECENT_LOADS]
            del self._loading[key]
            self._ready[key] = prepared
            future.set_result(prepared)
            log.info("adapter prepared", extra={"adapter": key, "seconds": round(seconds, 4),
                                                "methods": list(adapter.methods)})
        finally:
            self.on_change()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
