"""The engine: what the HTTP layer talks to.

    engine = Engine(EngineSettings())
    await engine.start()                       # loads the base model (in a thread)
    handle = engine.submit(GenerationRequest(prompt="hi", adapter=AdapterSpec(key, loader)))
    async for event in handle: ...             # TokenEvent per token; handle.cancel()
    await engine.stop(drain_timeout=30)

Hooks for the serving layer: ``engine.subscribe(observer)``: it receives a :class:`StepReport`
per forward (batch size, adapters per row: metrics, hot-tenant share of recent tokens);
``engine.base`` gives the model and tokenizer; the per-request loader is where host cache /
Redis / HyperLoader generation plug in.

Hot tenants (:mod:`tessera.engine.hot`): while one low-rank adapter dominates the traffic,
steps run on W0 + its delta (a buffer beside the base) and the other rows of the same
forward are corrected; admins pin with ``await engine.pin(spec)`` / ``engine.unpin(key)``;
``engine.is_merged(key)`` and ``engine.stats().hot`` (merged share of recent tokens) are
for metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tessera.adapters import Adapter, SlotPool
from tessera.adapters.targets import TargetInfo
from tessera.engine import ops
from tessera.engine.detok import TextStream
from tessera.engine.errors import (
    ContextLengthError,
    EngineStoppedError,
    PromptTooLargeError,
    RequestValidationError,
)
from tessera.engine.graphs import build as build_graphs
from tessera.engine.hot import HotStats, HotTenants
from tessera.engine.model import LoadedModel, load_base
from tessera.engine.requests import AdapterSpec, GenerationRequest, RequestHandle
from tessera.engine.sampling import Sampler
from tessera.engine.scheduler import Scheduler, StepReport
from tessera.engine.settings import EngineSettings
from tessera.engine.slots import SlotManager, SlotStats
from tessera.engine.step import Row, Stepper

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    queue_depth: int
    running_rows: int
    prefilling_rows: int
    steps: int
    last_batch_size: int
    last_distinct_adapters: int
    tokens_in: int
    tokens_out: int
    finished: dict[str, int]
    slots: SlotStats
    resident_adapters: int
    kv_tokens_used: int = 0  # KV positions held (rounded up to blocks)
    kv_tokens_total: int = 0  # the KV budget (TESSERA_KV_CACHE_TOKENS)
    kv_tokens_rows: int = 0  # each row's length rounded up to blocks, summed (<= used)
    preemptions: int = 0  # rows preempted for the KV budget, recomputed later
    max_slots: int = 0  # adapters the device holds at once (TESSERA_NUM_SLOTS)
    running_adapters: tuple[str, ...] = ()  # adapter keys of running or prefilling rows
    waiting_adapters: tuple[str, ...] = ()  # adapter keys of waiting rows
    hot: HotStats | None = field(default=None)  # hot-tenant policy: merged adapters, share
    pool_bytes: int = 0  # the slot pool's bank tensors (fixed at start)
    derived_bytes: int = 0  # kept derived from the slots: stacked factors, HUT dense weights
    kernels: str = "torch"  # the adapter banks' batched ops: torch or triton (``kernels``)
    attention: str = "torch"  # the decode attention's backend (tessera.engine.ops)
    graph_steps: int = 0  # decode steps run static (tessera.engine.graphs): replayed graphs
    graph_captures: int = 0  # CUDA graphs captured (one per padded size and slab)


class Engine:
    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self._base: LoadedModel | None = None
        self._scheduler: Scheduler | None = None
        self._slots: SlotManager | None = None
        self._hot: HotTenants | None = None
        self._forward: ThreadPoolExecutor | None = None
        self._loads: ThreadPoolExecutor | None = None

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        if self._scheduler is not None:
            raise RuntimeError("engine already started")
        self._forward = ThreadPoolExecutor(1, thread_name_prefix="tessera-forward")
        self._loads = ThreadPoolExecutor(self.settings.load_workers,
                                         thread_name_prefix="tessera-load")
        loop = asyncio.get_running_loop()
        self._base = await loop.run_in_executor(self._forward, load_base, self.settings)
        pool = SlotPool(self._base.model, self.settings.pool_config())
        self._slots = SlotManager(pool, self._loads, on_change=self._wake)
        self._hot = HotTenants(self.settings, pool, self._loads,
                               on_change=self._wake)
        attention = ops.resolve(pool.backend, self._base.device, self._base.dtype)
        base = self._base
        graphs = build_graphs(self.settings.decode_graphs, base.model, pool, attention,
                              base.layers, base.device, base.dtype,
                              self.settings.max_batch_rows)
        stepper = Stepper(base, pool, self.settings.kv_budget(), attention, graphs)
        scheduler = Scheduler(self.settings, stepper, self._slots, self._forward,
                              hot_of=self._hot.wanted, observers=[self._record])
        self._scheduler = scheduler
        scheduler.start()
        self._hot.start()
        log.info("engine started", extra={"model": self._base.name,
                                          "slots": self.settings.num_slots,
                                          "kernels": pool.backend, "attention": attention,
                                          "decode_graphs": graphs is not None and (
                                              "captured" if graphs.capture else "eager"),
                                          "pool_bytes": pool.nbytes})

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Stop accepting, finish in-flight requests (``drain_timeout`` seconds at most,
        default from the settings), then release the threads."""
        timeout = self.settings.drain_timeout_s if drain_timeout is None else drain_timeout
        if self._scheduler is not None:
            await self._scheduler.stop(timeout)
        if self._hot is not None:
            await self._hot.stop()
        if self._slots is not None:
            await self._slots.close()
        for executor in (self._forward, self._loads):
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)
        log.info("engine stopped")

    def _wake(self) -> None:
        """A slot load or a merge finished: the scheduler may have work again."""
        if self._scheduler is not None:
            self._scheduler.wake()

    @property
    def targets(self) -> Mapping[str, TargetInfo]:
        """The base model's adaptable modules the slot pool wraps (path -> shapes)."""
        return self.slots.pool.targets

    def check_adapter(self, adapter: Adapter) -> None:
        """Validate ``adapter`` against the base and the pool's methods and limits, and
        lower it as a load would (every lowered tensor finite in the banks' dtype); the
        lowered data is dropped. Raises ``AdapterValidationError`` / ``PoolError``. Safe in
        a worker thread."""
        self.slots.pool.prepare(adapter)

    def subscribe(self, observer: Callable[[StepReport], None]) -> None:
        """Call ``observer`` with each step's :class:`StepReport` (metrics)."""
        self.scheduler.subscribe(observer)

    @property
    def base(self) -> LoadedModel:
        if self._base is None:
            raise EngineStoppedError("the engine is not started")
        return self._base

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            raise EngineStoppedError("the engine is not started")
        return self._scheduler

    @property
    def hot(self) -> HotTenants:
        if self._hot is None:
            raise EngineStoppedError("the engine is not started")
        return self._hot

    @property
    def slots(self) -> SlotManager:
        if self._slots is None:
            raise EngineStoppedError("the engine is not started")
        return self._slots

    # --- requests -----------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Validate, queue and return the request's handle. Raises
        ``RequestValidationError`` / ``ContextLengthError`` (bad request), ``QueueFullError``
        (retry later), ``EngineStoppedError`` (shutting down). Call on the event loop; a
        text or chat prompt is tokenized here, so callers on a server tokenize first with
        :meth:`prompt_ids` in a worker thread and submit the ids."""
        scheduler, base = self.scheduler, self.base
        prompt = self.prompt_ids(request)
        params = request.sampling
        max_tokens = params.max_tokens or self.settings.default_max_tokens
        if max_tokens > self.settings.max_tokens_limit:
            raise RequestValidationError(f"max_tokens {max_tokens} exceeds the limit of "
                                         f"{self.settings.max_tokens_limit}")
        if len(prompt) + max_tokens > base.context_limit:
            raise ContextLengthError(len(prompt), max_tokens, base.context_limit)
        if len(params.stop) > self.settings.max_stop_sequences:
            raise RequestValidationError(f"{len(params.stop)} stop sequences; at most "
                                         f"{self.settings.max_stop_sequences} allowed")
        if any(len(s) > self.settings.max_stop_length or not s for s in params.stop):
            raise RequestValidationError(f"stop sequences must be 1 to "
                                         f"{self.settings.max_stop_length} characters")
        handle = RequestHandle(request.request_id, len(prompt), scheduler.wake)
        adapter = request.adapter
        seq = Row(request_id=request.request_id, handle=handle, prompt=prompt,
                       max_tokens=max_tokens,
                       sampler=Sampler(params, prompt, base.eos_token_ids,
                                       int(base.model.config.vocab_size)),
                       stream=TextStream(base.decode, params.stop, prompt,
                                         min_tokens=params.min_tokens),
                       key=adapter.key if adapter else None,
                       loader=adapter.loader if adapter else None,
                       ignore_eos=params.ignore_eos, submitted_at=time.monotonic())
        scheduler.enqueue(seq)  # raises QueueFullError / EngineStoppedError
        if adapter is not None:
            self.hot.observe(adapter.key, adapter.loader)
            if not self.hot.is_merged(adapter.key):  # a merged row needs no slot
                self.slots.request(adapter.key, adapter.loader)
        return handle

    def alive(self) -> bool:
        """The model is loaded and the scheduler loop beats (readiness)."""
        return (self._base is not None and self._scheduler is not None
                and self._scheduler.alive(self.settings.ready_stall_s))

    async def drain(self, timeout_s: float | None = None) -> None:
        """Stop accepting; running requests get ``timeout_s`` (default: the drain setting)
        to finish, then end with finish reason ``shutdown``. Call before the HTTP server
        closes its connections, so that every open stream gets its final chunk."""
        if self._scheduler is not None:
            await self._scheduler.stop(
                self.settings.drain_timeout_s if timeout_s is None else timeout_s)

    # --- hot tenants ------------------------------------------------------------------
    async def pin(self, adapter: AdapterSpec) -> None:
        """Admin: make ``adapter`` the hot one regardless of traffic, until :meth:`unpin`
        (one at a time: a later pin replaces it). Returns once its merge is ready. Raises
        ``NotMergeableError`` unless it is low-rank only (LoRA, HRA), or the load's error."""
        await self.hot.pin(adapter.key, adapter.loader)

    def unpin(self, key: str) -> bool:
        """Admin: release a pin; the policy drops the merged copy at its next check unless
        the adapter's traffic keeps it hot. False when ``key`` was not pinned."""
        return self.hot.unpin(key)

    def is_merged(self, key: str) -> bool:
        """New rows of ``key`` run on the hot merge (for metrics labels)."""
        return self._hot is not None and self._hot.is_merged(key)

    def method_of(self, key: str) -> str:
        """The adapter's method(s), whether it sits in a slot or runs merged."""
        return self.slots.method_of(key) or self.hot.method_of(key)

    def _record(self, report: StepReport) -> None:
        if self._hot is not None:
            self._hot.record(report.generated)

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """The request's prompt as token ids (thread-safe). A text prompt too long in bytes
        to fit the context in any tokenization is refused before it is tokenized."""
        base = self.base
        if (request.prompt is None) == (request.messages is None):
            raise RequestValidationError("give exactly one of prompt and messages")
        text = ([m.get("content", "") for m in request.messages]
                if request.messages is not None
                else [request.prompt] if isinstance(request.prompt, str) else [])
        size = sum(len(t.encode("utf-8", "surrogatepass")) for t in text
                   if isinstance(t, str))
        if size > base.max_prompt_bytes:
            raise PromptTooLargeError(size, base.max_prompt_bytes, base.context_limit)
        if request.messages is not None:
            ids = base.apply_chat_template(request.messages)
        elif isinstance(request.prompt, str):
            ids = base.encode(request.prompt)
        else:
            assert request.prompt is not None
            ids = [int(i) for i in request.prompt]
            vocab = int(base.model.config.vocab_size)
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise RequestValidationError(f"token id {bad[0]} is outside the vocabulary "
                                             f"[0, {vocab})")
        if not ids:
            raise RequestValidationError("the prompt is empty")
        return ids

    def stats(self) -> EngineStats:
        scheduler, slots = self.scheduler, self.slots
        s = scheduler.stats
        graphs = scheduler.stepper.graphs
        return EngineStats(
            queue_depth=len(scheduler.waiting), running_rows=len(scheduler.stepper.running),
            prefilling_rows=len(scheduler.prefilling), steps=s.steps,
            last_batch_size=s.last_batch_size,
            last_distinct_adapters=s.last_distinct_adapters, tokens_in=s.tokens_in,
            tokens_out=s.tokens_out, finished=dict(s.finished),
            slots=SlotStats(**{**vars(slots.stats),
                               "load_seconds": list(slots.stats.load_seconds)}),
            resident_adapters=len(slots.resident_keys),
            kv_tokens_used=scheduler.kv_in_use(), kv_tokens_total=self.settings.kv_cache_tokens,
            kv_tokens_rows=scheduler.kv_rows(),
            preemptions=s.preemptions, max_slots=self.settings.num_slots,
            running_adapters=_keys([*scheduler.stepper.running, *scheduler.prefilling]),
            waiting_adapters=_keys(scheduler.waiting), hot=self.hot.stats(),
            pool_bytes=slots.pool.nbytes, derived_bytes=slots.pool.derived_nbytes,
            kernels=slots.pool.backend, attention=scheduler.stepper.attention,
            graph_steps=graphs.steps if graphs else 0,
            graph_captures=graphs.captures if graphs else 0)


def _keys(rows: Iterable[Row]) -> tuple[str, ...]:
    """Distinct adapter keys of ``rows``, sorted (base rows have none)."""
    return tuple(sorted({s.key for s in rows if s.key is not None}))
