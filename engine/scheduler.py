"""Continuous batching on the event loop, forwards in one worker thread.

Every iteration of :meth:`Scheduler._run`:

1. reap: cancelled waiting requests finish, cancelled rows are marked for removal (and
   unpinned), requests whose adapter load failed fail (only those);
2. admit: waiting requests whose adapter holds a slot (pinned for the row) join, up to
   ``max_batch_rows``; a cold adapter's load was started at submit, off the loop;
3. step (forward thread): drop removed rows, copy newly placed adapters into their slots,
   then ONE forward over a packed sequence: the next token of every running row and the
   prefill chunks of joining rows (their first token comes out of it) — any mix of
   adapters and methods, slot id per token (:mod:`tessera.engine.step`);
4. deliver the step's events to the requests' handles; finished rows are unpinned.

Hot tenants (:mod:`tessera.engine.hot`): between steps the scheduler installs the merge
``hot_of()`` wants, once no row of the previous one is left; a waiting request of the
installed adapter joins without a slot and runs on the merge, in the same forward.

A request submitted during a step joins at the next one. The asyncio loop never runs
a forward, so it stays responsive. KV cache layout and costs: :mod:`tessera.engine.kvcache`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tessera.engine.errors import AdapterLoadError, EngineStoppedError, QueueFullError, StepError
from tessera.engine.hot import Merge
from tessera.engine.requests import FinishReason, TokenEvent
from tessera.engine.settings import EngineSettings
from tessera.engine.slots import SlotManager
from tessera.engine.step import Row, Stepper, StepPlan, StepResult

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0  # the idle loop wakes this often, so its heartbeat stays fresh


@dataclass(frozen=True)
class StepReport:
    """What one forward step ran (for metrics and tests)."""

    index: int
    request_ids: tuple[str, ...]  # per forward row: decode rows, then prefill chunks
    adapters: tuple[str | None, ...]  # per forward row; None = base
    decode_rows: int
    prefill_tokens: int
    merged: tuple[bool, ...] = ()  # per forward row: served from a hot adapter's merged copy
    generated: tuple[tuple[str | None, bool], ...] = ()  # per new token: (adapter, merged)
    queued: tuple[float, ...] = ()  # seconds waited by each row admitted for this step

    @property
    def merged_rows(self) -> int:
        return sum(self.merged)

    @property
    def distinct_adapters(self) -> int:
        return len({a for a in self.adapters if a is not None})


@dataclass
class SchedulerStats:
    steps: int = 0
    tokens_in: int = 0  # prompt tokens prefilled
    tokens_out: int = 0  # tokens generated
    last_batch_size: int = 0
    last_distinct_adapters: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # finish reason / "error" -> n
    preemptions: int = 0  # rows that left the batch for the KV budget (recomputed later)


class Scheduler:
    def __init__(self, settings: EngineSettings, stepper: Stepper, slots: SlotManager,
                 executor: ThreadPoolExecutor, *,
                 hot_of: Callable[[], tuple[str, Merge] | None] = lambda: None,
                 observers: Sequence[Callable[[StepReport], None]] = ()) -> None:
        self.settings = settings
        self.stepper = stepper
        self.slots = slots
        self.executor = executor  # one thread: forwards are serialised
        self.stats = SchedulerStats()
        self._observers: list[Callable[[StepReport], None]] = list(observers)
        # the hot-tenant policy's merged model for an adapter key (None = the slot pool)
        self.hot_of = hot_of
        self._install: tuple[str | None, Merge | None] | None = None  # for the next step
        self.waiting: deque[Row] = deque()
        self.prefilling: list[Row] = []
        self._removed: set[Row] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._accepting = False
        self._abort = False
        self._idle = asyncio.Event()
        self._latency_ewma = 1.0  # seconds per request (the Retry-After estimate)
        self._admitted = 0  # admission counter (a row's ``order``)
        self._queued: list[float] = []  # waits of the rows admitted since the last report
        self.heartbeat = time.monotonic()  # the loop's last beat (readiness)

    def subscribe(self, observer: Callable[[StepReport], None]) -> None:
        """Call ``observer`` with every step's :class:`StepReport` (on the event loop; an
        observer that raises is logged and never stops serving)."""
        self._observers.append(observer)

    # --- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self._accepting = True
        self._task = asyncio.create_task(self._run(), name="tessera scheduler")

    async def stop(self, drain_timeout: float) -> None:
        """Stop accepting; let waiting and running requests finish for up to
        ``drain_timeout`` seconds, then end the rest with finish reason "shutdown"."""
        self._accepting = False
        self.wake()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=drain_timeout)
        except TimeoutError:
            log.warning("drain timed out; ending the remaining requests",
                        extra={"running": len(self.stepper.running),
                               "waiting": len(self.waiting)})
            self._abort = True
            self.wake()
            await self._task

    def wake(self) -> None:
        self._wake.set()

    # --- admission ----------------------------------------------------------------------
    def enqueue(self, seq: Row) -> None:
        if not self._accepting:
            raise EngineStoppedError("the engine is not accepting requests")
        if len(self.waiting) >= self.settings.max_queue:
            raise QueueFullError(len(self.waiting), self.retry_after())
        self.waiting.append(seq)
        self.wake()

    def retry_after(self) -> int:
        rounds = math.ceil((len(self.waiting) + 1) / self.settings.max_batch_rows)
        estimate = math.ceil(self._latency_ewma * rounds)
        return max(self.settings.retry_after_min_s,
                   min(self.settings.retry_after_max_s, estimate))

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.stepper.running)

    # --- the loop -----------------------------------------------------------------------
    def alive(self, stall_s: float) -> bool:
        """Accepting (not draining), the loop runs and has beaten within ``stall_s`` seconds
        (it beats at least every :data:`HEARTBEAT_S` while idle, and after every step)."""
        return (self._accepting and self._task is not None and not self._task.done()
                and time.monotonic() - self.heartbeat <= stall_s)

    async def _run(self) -> None:
        while True:
            self.heartbeat = time.monotonic()
            self._wake.clear()
            if self._abort:
                self._abort_all()
                return
            try:
                stop = await self._iteration()
            except Exception as exc:  # a bug outside the forward: fail the batch, go on
                log.exception("scheduler iteration failed")
                self._fail_batch(StepError(f"scheduler failed: {exc!r}"))
                await asyncio.sleep(HEARTBEAT_S / 20)  # a persistent bug must not spin
                continue
            if stop:
                return

    async def _iteration(self) -> bool:
        """One round: reap, admit, step, deliver. True once drained after ``stop``."""
        self._reap()
        self._admit()
        plan = self._plan()
        if plan is None:
            if not self._accepting and not self.busy:
                return True
            with contextlib.suppress(TimeoutError):  # idle: still beat for readiness
                await asyncio.wait_for(self._wake.wait(), HEARTBEAT_S)
            return False
        self._removed = set()
        index = self.stats.steps
        self.stats.steps += 1
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self.executor, self.stepper.step, plan)
        except Exception as exc:  # the stepper contains row and group failures itself
            log.exception("step failed", extra={"step": index})
            self._fail_batch(StepError(f"forward step failed: {exc!r}"))
            return False
        self._deliver(index, result)
        return False

    def _reap(self) -> None:
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            self._finish(seq, "cancelled", None)
        failed: set[str] = set()
        for seq in list(self.waiting):
            error = self.slots.failure(seq.key) if seq.key is not None else None
            if error is not None:
                self.waiting.remove(seq)
                failed.add(error.key)
                self._fail(seq, error)
        for key in failed:
            self.slots.forget_failure(key)
        for seq in [*self.prefilling, *self.stepper.running]:
            if seq.cancelled and seq not in self._removed:
                self._removed.add(seq)
                if seq in self.prefilling:
                    self.prefilling.remove(seq)
                    seq.kv = None
                self._finish(seq, "cancelled", None)

    def kv_in_use(self) -> int:
        """KV token positions held: the running rows', and the prompt tokens prefilled so
        far by rows still prefilling (rounded up to blocks)."""
        return self.stepper.kv_in_use() + self._prefill_held()

    def kv_rows(self) -> int:
        """:meth:`kv_in_use` as paged blocks would count it: each running row's own length
        rounded up to blocks (not the slab's rows x longest row), plus the prefilling."""
        return self.stepper.kv_rows() + self._prefill_held()

    def _prefill_held(self) -> int:
        budget = self.stepper.budget
        return sum(budget.blocks(s.prefilled) * budget.block for s in self.prefilling)

    def _hot_target(self) -> str | None:
        """The adapter whose rows run merged from the next step on: the merge ``hot_of``
        wants, planned for installation once no hot row of the installed one is left
        (they hold no slot), else the installed one."""
        want = self.hot_of()
        key = want[0] if want is not None else None
        installed = self.stepper.hot_key
        if key == installed:
            self._install = None
            return installed
        rows = [*self.stepper.running, *self.prefilling, *self.waiting]
        if any(s.hot and s not in self._removed for s in rows):
            self._install = None
            return installed
        self._install = (key, None if want is None else want[1])
        return key

    def _admit(self) -> None:
        hot = self._hot_target()
        live = len(self.stepper.running) - len(self._removed & set(self.stepper.running))
        free = self.settings.max_batch_rows - live - len(self.prefilling)
        budget = self.stepper.budget
        rows = live + len(self.prefilling)
        width = max([self.stepper.width(), *(len(s.pending) for s in self.prefilling)])
        for seq in list(self.waiting):
            if free <= 0:
                break
            if rows and not budget.fits(rows + 1, max(width, len(seq.pending))):
                break  # the KV budget is full: in order, so nobody overtakes
            if seq.slot >= 0 or seq.hot:
                pass  # preempted: it kept its slot (and pin) or its hot merge while it waited
            elif seq.key is None or seq.key == hot:
                seq.slot = -1
                seq.hot = seq.key is not None  # a merged row needs no slot
            else:
                slot = self.slots.acquire(seq.key)
                if slot is None:
                    if seq.loader is not None:  # evicted while it waited: load again
                        self.slots.request(seq.key, seq.loader, count=False)
                    continue
                seq.slot = slot
            self.waiting.remove(seq)
            self.prefilling.append(seq)
            self._admitted += 1
            seq.order = self._admitted
            if seq.resume is None:  # its first admission (a preempted row waited already)
                self._queued.append(time.monotonic() - seq.submitted_at)
            free -= 1
            rows += 1
            width = max(width, len(seq.pending))
        self.slots.drop_unneeded({s.key for s in self.waiting if s.key is not None})

    def _plan(self) -> StepPlan | None:
        budget = self.settings.prefill_tokens_per_step
        prefill: list[tuple[Row, int]] = []
        for seq in self.prefilling:
            if budget <= 0:
                break
            count = min(self.settings.prefill_chunk, len(seq.pending) - seq.prefilled, budget)
            prefill.append((seq, count))
            budget -= count
        writes = self.slots.take_writes()
        preempted = self.stepper.overflow(self._removed, self._prefill_held())
        for seq in preempted:  # newest first: each goes back to the front of the queue
            seq.preempt()
            self.waiting.appendleft(seq)
        self.stats.preemptions += len(preempted)
        if preempted:
            log.info("KV budget full: rows preempted, recomputed later",
                     extra={"rows": len(preempted), "kv_in_use": self.kv_in_use()})
        live = [s for s in self.stepper.running
                if s not in self._removed and s not in preempted]
        if not prefill and not live and not writes and not self._removed and not preempted:
            return None
        install, self._install = self._install, None
        return StepPlan(writes=writes, prefill=prefill, dropped=set(self._removed),
                        preempted=set(preempted), install=install)

    def _deliver(self, index: int, result: StepResult) -> None:
        for write, exc in result.failed_writes:
            self.slots.write_failed(write)
            error = AdapterLoadError(write.key, exc)
            for seq in [s for s in self.prefilling
                        if s.key == write.key and not s.hot]:
                self.prefilling.remove(seq)
                self._fail(seq, error, release=False)
            for seq in [s for s in self.waiting if s.key == write.key]:
                self.waiting.remove(seq)
                self._fail(seq, error, release=False)
        for seq, event in result.events:
            seq.handle.put(event)
        for seq in result.joined:
            self.prefilling.remove(seq)
        for seq, exc in result.failed:  # one row's own failure (or its group's forward)
            if seq in self.prefilling:
                self.prefilling.remove(seq)
            self._fail(seq, exc)
        for seq in result.finished:
            if seq in self.prefilling:
                self.prefilling.remove(seq)
            self._finish(seq, seq.finish or "stop", None, send=False)
        self.stats.tokens_in += result.prefill_tokens
        self.stats.tokens_out += len(result.events)
        self.stats.last_batch_size = len(result.adapters)  # decode rows + prefill rows
        report = StepReport(index=index,
                            request_ids=tuple(result.request_ids),
                            adapters=tuple(result.adapters), decode_rows=result.decode_rows,
                            prefill_tokens=result.prefill_tokens,
                            merged=tuple(result.merged),
                            generated=tuple((s.key, s.hot)
                                            for s, e in result.events
                                            if e.token_id is not None),
                            queued=tuple(self._queued))
        self._queued = []
        self.stats.last_distinct_adapters = report.distinct_adapters
        for callback in self._observers:
            try:
                callback(report)
            except Exception:  # an observer (metrics, hot policy) never stops serving
                log.exception("step observer failed", extra={"step": index})

    # --- endings ------------------------------------------------------------------------
    def _finish(self, seq: Row, reason: FinishReason, error: BaseException | None,
                *, send: bool = True, release: bool = True) -> None:
        if seq.ended:
            return
        seq.ended = True
        if release and seq.key is not None and seq.slot >= 0:
            self.slots.release(seq.key)
            seq.slot = -1
        key = "error" if error is not None else reason
        self.stats.finished[key] = self.stats.finished.get(key, 0) + 1
        elapsed = time.monotonic() - seq.submitted_at
        self._latency_ewma = 0.9 * self._latency_ewma + 0.1 * elapsed
        if error is not None:
            seq.handle.put(error)
        elif send:
            seq.handle.put(TokenEvent(token_id=None, text=seq.stream.flush(),
                                      finish_reason=reason, prompt_tokens=len(seq.prompt),
                                      completion_tokens=seq.completion))

    def _fail(self, seq: Row, error: BaseException, *, release: bool = True) -> None:
        self._finish(seq, "stop", error, release=release)

    def _fail_batch(self, error: BaseException) -> None:
        for seq in [*self.stepper.running, *self.prefilling]:
            self._fail(seq, error)
        self.prefilling = []
        self._removed = set()
        self.stepper.clear()

    def _abort_all(self) -> None:
        for seq in list(self.waiting):
            self._finish(seq, "shutdown", None)
        self.waiting.clear()
        for seq in [*self.prefilling, *self.stepper.running]:
            self._finish(seq, "shutdown", None)
        self.prefilling = []
        self._removed = set()
        self.stepper.clear()
