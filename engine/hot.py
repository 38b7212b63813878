"""Hot tenants: serve a busy adapter's rows from merged weights kept *beside* the shared base.

Policy (``EngineSettings.hot_*``), checked every ``hot_interval_s`` on the event loop:

- every generated token is recorded with its adapter key and whether it ran merged; the
  window is the last ``hot_window_s`` seconds;
- an adapter enters when its share of the window's tokens reaches ``hot_enter_share`` (and
  the window holds at least ``hot_min_tokens``); a merged one stays while its share is at
  least ``hot_leave_share`` (hysteresis), so a cooling tenant is dropped, and a tenant
  whose traffic stopped is dropped once its tokens leave the window;
- at most ``hot_max_merged`` adapters are merged by the policy (highest share first);
  admin pins (:meth:`HotTenants.pin`) come on top and stay merged regardless of traffic.

Eligibility: an adapter is merged only when every component is a weight-stage method with
a merged form (LoRA, DoRA, HRA, HUT, SoKA). An adapter with an output-stage part
(bottleneck, a HyperLoader task = LoRA + bottleneck) is never merged; its rows always run
through the slot pool. (Merging only its LoRA part would still need the pool for the
bottleneck: no gain, one more path.) Eligibility is known once the adapter is loaded; an
ineligible key is remembered and never tried again.

A merged *variant* (:func:`build_variant`) is a structural copy of the base model whose
targeted projections hold new tensors from ``tessera.adapters.merged_weights``; every other module
shares the base's parameter and buffer tensors (no copy), and the slot-pool wrappers are
left out (a merged row needs no slot). It is built in a load worker thread, off the
forward loop; it becomes visible to the scheduler on the loop thread, so the switch
happens between steps. A new row of a merged adapter runs on the variant, as a separate
forward group with its own KV cache (:mod:`tessera.engine.step`); rows keep the path they started
on until they finish (a dropped variant lives on until its last row ends). The base
model's parameters are never written.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tessera.adapters import Adapter, NotMergeableError, merged_weights, registry
from tessera.adapters import targets as tg
from tessera.engine.settings import EngineSettings
from tessera.engine.slots import AdapterLoader

log = logging.getLogger(__name__)

Token = tuple[str | None, bool]  # (adapter key, None = base; served merged)


def eligible(adapter: Adapter) -> bool:
    """Every component weight-stage and mergeable (no bottleneck / output-stage part)."""
    methods = [registry.get(c.method) for c in adapter.components]
    return bool(methods) and all(m.stage == "weight" and m.mergeable for m in methods)


def build_variant(model: nn.Module, adapter: Adapter) -> nn.Module:
    """A copy of ``model``'s module tree computing ``adapter`` with merged weights.

    Only the merged projections get new tensors (in the module's own layout); every other
    parameter and buffer *is* the base's tensor. Slot-pool wrappers are replaced by the
    projection they wrap. ``model`` is only read."""
    if not eligible(adapter):
        raise NotMergeableError(f"adapter {adapter.methods} has a part with no merged form")
    with torch.no_grad():
        merged = merged_weights(model, adapter)
    # deepcopy consults ``memo`` first: an entry maps an original object to what the copy
    # uses instead. Tensors and the config map to themselves (shared, never copied).
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    config = getattr(model, "config", None)
    if config is not None:
        memo[id(config)] = config
    for path, module in model.named_modules():
        base = tg.unwrap(module)
        if path in merged:
            weight, bias = merged[path]
            memo[id(module)] = _merged_projection(base, weight, bias)
        elif base is not module:
            memo[id(module)] = base  # an unused slot-pool wrapper: the plain projection
    variant = copy.deepcopy(model, memo)
    assert isinstance(variant, nn.Module)
    return variant.eval()


def _merged_projection(base: nn.Module, weight: torch.Tensor,
                       bias: torch.Tensor | None) -> nn.Module:
    """A copy of the Linear/Conv1D ``base`` holding ``weight`` (module layout) and ``bias``."""
    old_w, old_b = base.weight, tg.bias_of(base)
    assert isinstance(old_w, torch.Tensor)
    new_w = nn.Parameter(weight.to(old_w.dtype).contiguous(), requires_grad=False)
    inner: dict[int, Any] = {id(old_w): new_w}
    new_b = None if bias is None else nn.Parameter(bias.to(old_w.dtype), requires_grad=False)
    if old_b is not None:
        inner[id(old_b)] = new_b if new_b is not None else old_b
    projection = copy.deepcopy(base, inner)
    assert isinstance(projection, nn.Module)
    if old_b is None and new_b is not None:  # e.g. HUT's shift folded into a new bias
        projection.bias = new_b
    return projection


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
    """The policy and the merged variants. Every method runs on the event loop."""

    REMEMBERED = 4096  # loaders / ineligible keys kept (bounded)

    def __init__(self, settings: EngineSettings, model: nn.Module, executor: Executor,
                 on_change: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.model = model
        self.executor = executor  # load workers: builds run there, off the forward loop
        self.on_change = on_change  # wakes the scheduler when a variant appears
        self.clock = clock
        self._window: deque[tuple[float, Counter[str | None], int]] = deque()
        self._counts: Counter[str | None] = Counter()
        self._total = 0
        self._merged = 0
        self._merged_total = 0
        self._loaders: OrderedDict[str, AdapterLoader] = OrderedDict()
        self._ineligible: OrderedDict[str, None] = OrderedDict()
        self._failed: dict[str, float] = {}  # key -> when a build last failed
        self._active: dict[str, nn.Module] = {}
        self._methods: dict[str, str] = {}
        self._pinned: dict[str, AdapterLoader] = {}
        self._wanted: set[str] = set()
        self._building: dict[str, asyncio.Task[BaseException | None]] = {}
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
        self._active.clear()

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
    def variant(self, key: str) -> nn.Module | None:
        """The merged model new rows of ``key`` run on; None = the slot pool."""
        return self._active.get(key)

    def is_merged(self, key: str) -> bool:
        return key in self._active

    def method_of(self, key: str) -> str:
        return self._methods.get(key, "")

    # --- admin ----------------------------------------------------------------------------
    async def pin(self, key: str, loader: AdapterLoader) -> None:
        """Keep ``key`` merged regardless of traffic; returns once its variant serves.
        Raises ``NotMergeableError`` (e.g. a bottleneck part) or the load's error."""
        if key in self._ineligible:
            raise NotMergeableError(f"adapter {key!r} has a part with no merged form")
        self._pinned[key] = loader
        if key in self._active:
            return
        task = self._building.get(key) or self._start_build(key, loader)
        error = await asyncio.shield(task)
        if key not in self._active:
            self._pinned.pop(key, None)
            if error is not None:
                raise error
            raise NotMergeableError(f"adapter {key!r} could not be merged")

    def unpin(self, key: str) -> bool:
        """Release an admin pin; the policy decides at its next check. False if unpinned."""
        return self._pinned.pop(key, None) is not None

    # --- policy ---------------------------------------------------------------------------
    def evaluate(self) -> None:
        """Decide which adapters are merged; start builds and drop cooled variants."""
        s = self.settings
        shares = self.shares()
        now = self.clock()
        candidates = [k for k, share in shares.items()
                      if k not in self._pinned and k not in self._ineligible
                      and (share >= s.hot_leave_share if k in self._active
                           else share >= s.hot_enter_share and self._total >= s.hot_min_tokens
                           and now - self._failed.get(k, -1e18) >= s.hot_window_s)]
        candidates.sort(key=lambda k: (-shares[k], k not in self._active))
        self._wanted = set(candidates[:s.hot_max_merged])
        desired = self._wanted | set(self._pinned)
        for key in [k for k in self._active if k not in desired]:
            self._drop(key)
        for key in desired:
            loader = self._pinned.get(key) or self._loaders.get(key)
            if key not in self._active and key not in self._building and loader is not None:
                self._start_build(key, loader)

    async def settle(self) -> None:
        """Wait for the builds in progress (tests, shutdown)."""
        await asyncio.gather(*self._building.values(), return_exceptions=True)

    def stats(self) -> HotStats:
        self._expire(self.clock())
        return HotStats(merged=tuple(self._active), pinned=tuple(self._pinned),
                        building=tuple(self._building), window_tokens=self._total,
                        merged_window_tokens=self._merged,
                        merged_tokens_total=self._merged_total, builds=self.builds,
                        drops=self.drops, build_failures=self.build_failures,
                        ineligible=len(self._ineligible))

    # --- internals ------------------------------------------------------------------------
    def _drop(self, key: str) -> None:
        del self._active[key]  # running rows keep their reference until they finish
        self._methods.pop(key, None)
        self.drops += 1
        log.info("merged adapter dropped", extra={"adapter": key})

    def _start_build(self, key: str, loader: AdapterLoader
                     ) -> asyncio.Task[BaseException | None]:
        task = asyncio.create_task(self._build(key, loader), name=f"merge {key}")
        self._building[key] = task
        return task

    async def _build(self, key: str, loader: AdapterLoader) -> BaseException | None:
        start = time.perf_counter()
        try:
            adapter = await loader()
            if not eligible(adapter):
                self._ineligible[key] = None
                while len(self._ineligible) > self.REMEMBERED:
                    self._ineligible.popitem(last=False)
                log.info("adapter not mergeable; served through the slot pool",
                         extra={"adapter": key, "methods": list(adapter.methods)})
                return NotMergeableError(f"adapter {key!r} ({'+'.join(adapter.methods)}) "
                                         "has a part with no merged form")
            loop = asyncio.get_running_loop()
            variant = await loop.run_in_executor(self.executor, build_variant, self.model,
                                                 adapter)
        except Exception as exc:  # a failed build leaves the adapter on the slot pool
            self.build_failures += 1
            self._failed[key] = self.clock()
            log.warning("merged build failed", extra={"adapter": key, "error": repr(exc)})
            return exc
        finally:
            self._building.pop(key, None)
        if key in self._pinned or key in self._wanted:
            self._active[key] = variant
            self._methods[key] = "+".join(adapter.methods)
            self._failed.pop(key, None)
            self.builds += 1
            log.info("adapter merged", extra={"adapter": key, "methods": list(adapter.methods),
                                              "seconds": round(time.perf_counter() - start, 4)})
            self.on_change()
        return None
