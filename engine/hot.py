"""Hot tenants: while one adapter dominates the traffic, run every step on W0 + dW_hot.

dLoRA's way (OSDI'24), inside the one forward: the hot adapter's low-rank delta is merged
into a buffer beside each targeted W0 (:meth:`SlotPool.hot_merge`; W0 is never written).
The hot adapter's rows then need no slot and no adapter work; every other row of the same
forward gets ``-B_hot (A_hot x)`` back, so it computes ``W0 x`` before its own adapter
(:class:`~tessera.adapters.plan.HotDelta`). One KV cache, one forward, one set of weights
read per module. The correction reads the same factors the hot rows' slot work would, so
a merged step reads no more than one through slots; what it saves is the hot rows' adapter
work. On the 2-core CPU that measured a tie (``bench/decode_step.py --hot``,
``bench/engine_throughput.py --hot``), so the traffic policy is off by default
(``hot_merge``); admin pins work either way.

Eligible adapters lower to the low-rank bank only (LoRA, rsLoRA, HRA): their delta is
``B A`` and the correction is one rank-r product. DoRA and HUT multiply W0, SoKA's delta
is not low-rank, a bottleneck is not a weight: those always run through the slot pool.

Policy (``EngineSettings.hot_*``), checked every ``hot_interval_s`` on the event loop:

- every generated token is recorded with its adapter key and whether it ran merged; the
  window is the last ``hot_window_s`` seconds;
- the adapter with the largest share of the window's tokens becomes hot when its share
  reaches ``hot_enter_share`` (and the window holds at least ``hot_min_tokens``); the hot
  one stays while its share is at least ``hot_leave_share`` (hysteresis);
- one hot adapter at a time; an admin pin (:meth:`HotTenants.pin`) takes the place
  regardless of traffic (the latest pin wins).

The merge is built in a load worker, off the forward loop. The scheduler installs what
:meth:`HotTenants.wanted` returns between steps, once no row of the previous hot adapter
is left (those rows hold no slot); rows admitted while an adapter is installed run merged,
other rows of it keep their slots.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass

from tessera.adapters import Adapter, NotMergeableError, SlotPool
from tessera.adapters.plan import HotDelta
from tessera.engine.settings import EngineSettings
from tessera.engine.slots import AdapterLoader

log = logging.getLogger(__name__)

Token = tuple[str | None, bool]  # (adapter key, None = base; served merged)


Merge = dict[str, HotDelta]  # module path -> its share of a hot merge


def build_merge(pool: SlotPool, key: str, adapter: Adapter) -> Merge:
    """Validate, lower and merge ``adapter`` for ``pool`` (in a load worker). Raises
    ``NotMergeableError`` unless it lowers to the low-rank bank only."""
    prepared = pool.prepare(adapter)
    if not pool.mergeable_hot(prepared):
        raise NotMergeableError(f"adapter {key!r} ({'+'.join(adapter.methods)}) is not "
                                "low-rank only (LoRA, HRA): it runs through the slot pool")
    return pool.hot_merge(prepared)


@dataclass(frozen=True)
class HotStats:
    merged: tuple[str, ...]  # adapters whose new rows run merged
    pinned: tuple[str, ...]
    building: tuple[str, ...]
    window_tokens: int  # generated tokens in the window
    merged_window_tokens: int  # of those, served from merged weights
    merged_tokens_total: int
    builds: int
    drops: int
    build_failures: int
    ineligible: int  # keys found not mergeable

    @property
    def merged_share(self) -> float:
        """Share of the window's generated tokens served from merged weights."""
        return self.merged_window_tokens / self.window_tokens if self.window_tokens else 0.0


class HotTenants:
    """The policy and the hot merge it wants. Every method runs on the event loop."""

    REMEMBERED = 4096  # loaders / ineligible keys kept (bounded)

    def __init__(self, settings: EngineSettings, pool: SlotPool, executor: Executor,
                 on_change: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.pool = pool  # read only: prepare + merge run in load workers
        self.executor = executor  # load workers: builds run there, off the forward loop
        self.on_change = on_change  # wakes the scheduler when a merge is ready
        self.clock = clock
        self._window: deque[tuple[float, Counter[str | None], int]] = deque()
        self._counts: Counter[str | None] = Counter()
        self._total = 0
        self._merged = 0
        self._merged_total = 0
        self._loaders: OrderedDict[str, AdapterLoader] = OrderedDict()
        self._ineligible: OrderedDict[str, None] = OrderedDict()
        self._failed: dict[str, float] = {}  # key -> when a build last failed
        self._ready: tuple[str, Merge, str] | None = None  # (key, merge, methods) wanted
        self._pinned: tuple[str, AdapterLoader] | None = None
        self._wanted: str | None = None  # the policy's choice (a pin overrides it)
        self._building: dict[str, asyncio.Task[tuple[Merge, str]]] = {}
        self._ticker: asyncio.Task[None] | None = None
        self.builds = self.drops = self.build_failures = 0

    # --- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        self._ticker = asyncio.create_task(self._tick(), name="tessera hot tenants")

    async def stop(self) -> None:
        tasks = [t for t in (self._ticker, *self._building.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._ready = None

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.settings.hot_interval_s)
            try:
                self.evaluate()
            except Exception:  # the policy must never take serving down
                log.exception("hot-tenant policy check failed")

    # --- traffic ------------------------------------------------------------------------
    def observe(self, key: str, loader: AdapterLoader) -> None:
        """A request for ``key`` arrived: remember how to load it (for a later build)."""
        self._loaders[key] = loader
        self._loaders.move_to_end(key)
        while len(self._loaders) > self.REMEMBERED:
            self._loaders.popitem(last=False)

    def record(self, tokens: Iterable[Token]) -> None:
        """One step's generated tokens (``StepReport.generated``)."""
        counts: Counter[str | None] = Counter()
        merged = 0
        for key, is_merged in tokens:
            counts[key] += 1
            merged += is_merged
        if not counts:
            return
        self._window.append((self.clock(), counts, merged))
        self._counts.update(counts)
        self._total += counts.total()
        self._merged += merged
        self._merged_total += merged

    def _expire(self, now: float) -> None:
        horizon = now - self.settings.hot_window_s
        while self._window and self._window[0][0] < horizon:
            _, counts, merged = self._window.popleft()
            self._counts.subtract(counts)
            self._total -= counts.total()
            self._merged -= merged
        self._counts = +self._counts  # drop zero entries

    def shares(self) -> dict[str, float]:
        """Each adapter's share of the window's generated tokens (the base excluded)."""
        self._expire(self.clock())
        if not self._total:
            return {}
        return {k: n / self._total for k, n in self._counts.items() if k is not None}

    # --- serving ------------------------------------------------------------------------
    def wanted(self) -> tuple[str, Merge] | None:
        """The hot merge to install (the scheduler does, between steps); None = none."""
        return None if self._ready is None else self._ready[:2]

    def is_merged(self, key: str) -> bool:
        """New rows of ``key`` run on the hot merge (once the scheduler installed it)."""
        return self._ready is not None and self._ready[0] == key

    def method_of(self, key: str) -> str:
        return self._ready[2] if self._ready is not None and self._ready[0] == key else ""

    # --- admin ----------------------------------------------------------------------------
    async def pin(self, key: str, loader: AdapterLoader) -> None:
        """Make ``key`` the hot adapter regardless of traffic (replacing an earlier pin);
        returns once its merge is ready. Raises ``NotMergeableError`` (not low-rank only)
        or the load's error."""
        if key in self._ineligible:
            raise NotMergeableError(f"adapter {key!r} is not low-rank only (LoRA, HRA)")
        if not self.is_merged(key):  # a failed pin leaves the current one in place
            task = self._building.get(key) or self._start_build(key, loader)
            merge, methods = await asyncio.shield(task)
            self._adopt(key, merge, methods)
        self._pinned = (key, loader)

    def unpin(self, key: str) -> bool:
        """Release an admin pin; the policy decides at its next check. False if unpinned."""
        if self._pinned is None or self._pinned[0] != key:
            return False
        self._pinned = None
        return True

    # --- policy ---------------------------------------------------------------------------
    def evaluate(self) -> None:
        """Choose the hot adapter; start its build, or drop a cooled one."""
        s = self.settings
        shares = self.shares()
        now = self.clock()
        current = self._ready[0] if self._ready is not None else None
        candidates = [k for k, share in shares.items()
                      if k not in self._ineligible
                      and (share >= s.hot_leave_share if k == current
                           else share >= s.hot_enter_share and self._total >= s.hot_min_tokens
                           and now - self._failed.get(k, -1e18) >= s.hot_window_s)]
        candidates.sort(key=lambda k: (-shares[k], k != current))
        self._wanted = candidates[0] if candidates and s.hot_merge else None
        desired = self._pinned[0] if self._pinned is not None else self._wanted
        if current is not None and current != desired:
            self._drop(current)
        if desired is not None and desired != current and desired not in self._building:
            loader = (self._pinned[1] if self._pinned is not None
                      else self._loaders.get(desired))
            if loader is not None:
                self._start_build(desired, loader).add_done_callback(self._built)

    async def settle(self) -> None:
        """Wait for the builds in progress (tests, shutdown)."""
        await asyncio.gather(*self._building.values(), return_exceptions=True)

    def stats(self) -> HotStats:
        self._expire(self.clock())
        return HotStats(merged=() if self._ready is None else (self._ready[0],),
                        pinned=() if self._pinned is None else (self._pinned[0],),
                        building=tuple(self._building), window_tokens=self._total,
                        merged_window_tokens=self._merged,
                        merged_tokens_total=self._merged_total, builds=self.builds,
                        drops=self.drops, build_failures=self.build_failures,
                        ineligible=len(self._ineligible))

    # --- internals ------------------------------------------------------------------------
    def _drop(self, key: str) -> None:
        self._ready = None  # installed rows keep it until they finish (the scheduler)
        self.drops += 1
        log.info("hot adapter dropped", extra={"adapter": key})
        self.on_change()

    def _start_build(self, key: str, loader: AdapterLoader
                     ) -> asyncio.Task[tuple[Merge, str]]:
        task = asyncio.create_task(self._build(key, loader), name=f"merge {key}")
        self._building[key] = task
        task.add_done_callback(lambda _: self._building.pop(key, None))
        return task

    def _built(self, task: asyncio.Task[tuple[Merge, str]]) -> None:
        """A policy build ended: adopt it if it is still what the policy wants."""
        if task.cancelled() or task.exception() is not None:
            return  # counted and logged by _build; the adapter stays on the slot pool
        key = task.get_name().removeprefix("merge ")
        if self._pinned is None and self._wanted == key:
            self._adopt(key, *task.result())

    def _adopt(self, key: str, merge: Merge, methods: str) -> None:
        if self._ready is not None and self._ready[0] == key:
            return
        self._ready = (key, merge, methods)
        self._failed.pop(key, None)
        self.builds += 1
        log.info("adapter merged (hot)", extra={"adapter": key, "methods": methods})
        self.on_change()

    async def _build(self, key: str, loader: AdapterLoader) -> tuple[Merge, str]:
        start = time.perf_counter()
        try:
            adapter = await loader()
            loop = asyncio.get_running_loop()
            merge = await loop.run_in_executor(self.executor, build_merge, self.pool, key,
                                               adapter)
        except NotMergeableError as exc:
            self._ineligible[key] = None
            while len(self._ineligible) > self.REMEMBERED:
                self._ineligible.popitem(last=False)
            log.info("adapter not mergeable; served through the slot pool",
                     extra={"adapter": key, "error": str(exc)})
            raise
        except Exception as exc:  # a failed build leaves the adapter on the slot pool
            self.build_failures += 1
            self._failed[key] = self.clock()
            log.warning("merged build failed", extra={"adapter": key, "error": repr(exc)})
            raise
        log.info("hot merge built", extra={"adapter": key,
                                           "seconds": round(time.perf_counter() - start, 4)})
        return merge, "+".join(adapter.methods)
