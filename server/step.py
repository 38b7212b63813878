"""One scheduler step, run in the forward thread: slot writes, decode of the running rows
(every adapter and method in one forward, slot ids per row), chunked prefill of newly
admitted rows, sampling and detokenization.

The event loop never touches the state below while a step runs; the step never touches
the scheduler's queues. Each step returns the events to deliver.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from adapters import SlotPool
from server.detok import TextStream
from server.kvcache import BatchCache, cache_tensors
from server.model import LoadedModel
from server.requests import FinishReason, RequestHandle, TokenEvent
from server.sampling import Sampler
from server.slots import AdapterLoader, Write

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Row:
    """One request's generation state."""

    request_id: str
    handle: RequestHandle
    prompt: list[int]
    max_tokens: int
    sampler: Sampler
    stream: TextStream
    key: str | None  # adapter key; None = base
    loader: AdapterLoader | None = None
    ignore_eos: bool = False
    slot: int = -1
    prefilled: int = 0  # prompt tokens already in ``cache``
    cache: DynamicCache | None = None  # own cache while prefilling
    last_token: int = -1
    completion: int = 0
    finish: FinishReason | None = None
    submitted_at: float = 0.0
    ended: bool = False  # its final event or error was handed out, its pin released

    @property
    def cancelled(self) -> bool:
        return self.handle.cancelled


@dataclass
class StepPlan:
    writes: list[Write]
    prefill: list[tuple[Row, int]]  # (sequence, prompt tokens to prefill now)
    dropped: set[Row]  # rows to remove from the batch before the forward


@dataclass
class StepResult:
    events: list[tuple[Row, TokenEvent]] = field(default_factory=list)
    failed_writes: list[tuple[Write, BaseException]] = field(default_factory=list)
    joined: list[Row] = field(default_factory=list)  # prefill finished -> running
    finished: list[Row] = field(default_factory=list)
    decode_rows: int = 0
    prefill_tokens: int = 0
    request_ids: list[str] = field(default_factory=list)  # per forward row
    adapters: list[str | None] = field(default_factory=list)  # per forward row


class Stepper:
    """Owns the running batch (its rows and KV cache); used only from the forward thread
    (and from the loop while no step runs)."""

    def __init__(self, base: LoadedModel, pool: SlotPool) -> None:
        self.base = base
        self.pool = pool
        self.model = base.model
        self.cache = BatchCache()
        self.running: list[Row] = []  # row i of ``cache``

    def step(self, plan: StepPlan) -> StepResult:
        with torch.no_grad():
            return self._step(plan)

    def _step(self, plan: StepPlan) -> StepResult:
        result = StepResult()
        if plan.dropped:
            self._keep([s for s in self.running if s not in plan.dropped])
        failed_keys: set[str] = set()
        for write in plan.writes:
            try:
                self.pool.write(write.slot, write.prepared)
            except Exception as exc:  # e.g. device OOM: only this adapter's rows fail
                log.warning("slot write failed", extra={"adapter": write.key,
                                                        "slot": write.slot, "error": repr(exc)})
                result.failed_writes.append((write, exc))
                failed_keys.add(write.key)
        if self.running:
            self._decode(result)
        for seq, count in plan.prefill:
            if seq.key is not None and seq.key in failed_keys:
                continue
            self._prefill(seq, count, result)
        if result.finished:
            gone = set(result.finished)
            self._keep([s for s in self.running if s not in gone])
        return result

    def clear(self) -> None:
        self.cache.clear()
        self.running = []

    # --- forwards -----------------------------------------------------------------------
    def _decode(self, result: StepResult) -> None:
        rows = self.running
        ids = torch.tensor([[s.last_token] for s in rows], dtype=torch.long,
                           device=self.base.device)  # [B, 1]
        slots = torch.tensor([s.slot for s in rows], dtype=torch.long)  # [B]
        cache, attention, positions = self.cache.step_inputs()
        with self.pool.use(slots):
            out = self.model(input_ids=ids, attention_mask=attention, position_ids=positions,
                             past_key_values=cache, use_cache=True)
        self.cache.advance(out.past_key_values, attention)
        logits = out.logits[:, -1, :]  # [B, V]
        greedy = logits.argmax(dim=-1).tolist()  # one host sync for the greedy rows
        for i, seq in enumerate(rows):
            token = greedy[i] if seq.sampler.generator is None else seq.sampler.pick(logits[i])
            self._emit(seq, int(token), result)
        result.decode_rows = len(rows)
        result.request_ids.extend(s.request_id for s in rows)
        result.adapters.extend(s.key for s in rows)

    def _prefill(self, seq: Row, count: int, result: StepResult) -> None:
        start = seq.prefilled
        chunk = seq.prompt[start:start + count]
        if seq.cache is None:
            seq.cache = DynamicCache()
        ids = torch.tensor([chunk], dtype=torch.long, device=self.base.device)  # [1, T]
        positions = torch.arange(start, start + len(chunk),
                                 device=self.base.device).unsqueeze(0)  # [1, T]
        with self.pool.use(torch.tensor([seq.slot])):
            out = self.model(input_ids=ids, position_ids=positions, past_key_values=seq.cache,
                             use_cache=True, logits_to_keep=1)
        seq.prefilled += len(chunk)
        result.prefill_tokens += len(chunk)
        result.request_ids.append(seq.request_id)
        result.adapters.append(seq.key)
        if seq.prefilled < len(seq.prompt):
            return
        token = seq.sampler.pick(out.logits[0, -1])  # [V]
        self._emit(seq, token, result)
        if seq.finish is None:
            self.cache.add(cache_tensors(seq.cache), len(seq.prompt))
            self.running.append(seq)
            result.joined.append(seq)
        seq.cache = None  # the batch cache holds a copy now

    def _emit(self, seq: Row, token: int, result: StepResult) -> None:
        seq.completion += 1
        seq.last_token = token
        text = seq.stream.push(token)
        eos = token in self.base.eos_token_ids and not seq.ignore_eos
        if seq.stream.stopped or eos:
            seq.finish = "stop"
        elif seq.completion >= seq.max_tokens:
            seq.finish = "length"
        if seq.finish is not None:
            text += seq.stream.flush()
            result.finished.append(seq)
        result.events.append((seq, TokenEvent(
            token_id=token, text=text, finish_reason=seq.finish,
            prompt_tokens=len(seq.prompt), completion_tokens=seq.completion)))

    def _keep(self, rows: list[Row]) -> None:
        index = {id(s): i for i, s in enumerate(self.running)}
        self.cache.keep([index[id(s)] for s in rows])
        self.running = rows
