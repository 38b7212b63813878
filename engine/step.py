"""One scheduler step, run in the forward thread: slot writes, decode of the running rows
(every adapter and method in one forward, slot ids per row), chunked prefill of newly
admitted rows, sampling and detokenization.

Rows of the hot adapter admitted while its merge is installed (:mod:`tessera.engine.hot`)
have ``Row.hot`` set: they hold no slot and run on the merged weights, in the same forward
and the same KV cache as every other row (the others get the hot delta taken back). The
step installs the merge the scheduler planned before any forward.

The event loop never touches the state below while a step runs; the step never touches
the scheduler's queues. Each step returns the events to deliver.

Failures are contained where they belong: a row whose sampling, stop strings,
detokenization or logits (NaN from its adapter) fail is dropped from the batch and reported
in ``StepResult.failed`` with a :class:`~tessera.engine.errors.RowError`; a prefill forward runs one
request, so its failure is that request's; a decode forward that fails is retried once
(its cache is untouched), then fails the rows of that forward group only
(:class:`~tessera.engine.errors.StepError`).
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from tessera.adapters import SlotPool
from tessera.engine.detok import TextStream
from tessera.engine.errors import RowError, StepError
from tessera.engine.hot import Merge
from tessera.engine.kvcache import KV, BatchCache, KVBudget, cache_tensors
from tessera.engine.model import LoadedModel
from tessera.engine.requests import FinishReason, RequestHandle, TokenEvent
from tessera.engine.sampling import NonFiniteLogitsError, Picked, Sampler, pick_batch
from tessera.engine.slots import AdapterLoader, Write

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
    hot: bool = False  # runs on the installed hot merge (holds no slot)
    generated: list[int] = field(default_factory=list)  # tokens emitted so far
    resume: list[int] | None = None  # preempted: the tokens to recompute before decoding on
    order: int = 0  # admission order (the newest row is preempted first)

    @property
    def cancelled(self) -> bool:
        return self.handle.cancelled

    @property
    def pending(self) -> list[int]:
        """The tokens its prefill runs over: the prompt, or after a preemption the prompt
        and every emitted token but the last (which the next decode step feeds)."""
        return self.prompt if self.resume is None else self.resume

    def preempt(self) -> None:
        """Leave the batch, to be recomputed later: no token is lost or changed (the
        sampler and the text stream keep their state)."""
        self.resume = self.prompt + self.generated[:-1]
        self.prefilled = 0
        self.cache = None


@dataclass
class StepPlan:
    writes: list[Write]
    prefill: list[tuple[Row, int]]  # (sequence, prompt tokens to prefill now)
    dropped: set[Row]  # rows to remove from the batch before the forward
    preempted: set[Row] = field(default_factory=set)  # rows leaving to be recomputed later
    install: tuple[str | None, Merge | None] | None = None  # (key, merge) to install first


@dataclass
class StepResult:
    events: list[tuple[Row, TokenEvent]] = field(default_factory=list)
    failed_writes: list[tuple[Write, BaseException]] = field(default_factory=list)
    joined: list[Row] = field(default_factory=list)  # prefill finished -> running
    finished: list[Row] = field(default_factory=list)
    failed: list[tuple[Row, BaseException]] = field(default_factory=list)  # row, its error
    decode_rows: int = 0
    prefill_tokens: int = 0
    request_ids: list[str] = field(default_factory=list)  # per forward row
    adapters: list[str | None] = field(default_factory=list)  # per forward row
    merged: list[bool] = field(default_factory=list)  # per forward row: ran on the hot merge


@dataclass(eq=False)
class Group:
    """The running rows and their batch KV cache."""

    cache: BatchCache
    rows: list[Row] = field(default_factory=list)  # row i of ``cache``

    def keep(self, rows: list[Row]) -> None:
        index = {id(s): i for i, s in enumerate(self.rows)}
        self.cache.keep([index[id(s)] for s in rows])
        self.rows = rows


class Stepper:
    """Owns the running batch (its rows and KV caches); used only from the forward thread
    (and from the loop while no step runs)."""

    def __init__(self, base: LoadedModel, pool: SlotPool, budget: KVBudget) -> None:
        self.base = base
        self.pool = pool
        self.budget = budget
        self.model = base.model
        self.main = Group(self._batch_cache())
        self.hot_key: str | None = None  # adapter of the hot merge installed in the pool

    def _batch_cache(self) -> BatchCache:
        return BatchCache(limit=self.budget.tokens, grouped=self.base.grouped_attention)

    @property
    def running(self) -> list[Row]:
        return list(self.main.rows)

    def _route(self, rows: list[Row], tokens: int = 1) -> AbstractContextManager[Any]:
        """The slot-pool routing of ``rows``, ``tokens`` per row (given per token, so the
        pool routes before the forward); hot rows run on the installed merge."""
        ids = torch.tensor([s.slot for s in rows]).unsqueeze(1).expand(-1, tokens)  # [B, T]
        hot = [s.hot for s in rows for _ in range(tokens)] if self.hot_key else None
        return self.pool.use(ids, hot=hot)

    def step(self, plan: StepPlan) -> StepResult:
        with torch.no_grad():
            return self._step(plan)

    def _step(self, plan: StepPlan) -> StepResult:
        result = StepResult()
        if plan.dropped or plan.preempted:
            self._keep(plan.dropped | plan.preempted)
        if plan.install is not None:  # no hot row of the previous merge is left
            key, merge = plan.install
            self.pool.install_hot(merge)
            self.hot_key = key
        failed_keys: set[str] = set()
        for write in plan.writes:
            try:
                self.pool.write(write.slot, write.prepared)
            except Exception as exc:  # e.g. device OOM: only this adapter's rows fail
                log.warning("slot write failed", extra={"adapter": write.key,
                                                        "slot": write.slot, "error": repr(exc)})
                result.failed_writes.append((write, exc))
                failed_keys.add(write.key)
        if self.main.rows:
            self._decode_group(self.main, result)
        prefill = [(seq, count) for seq, count in plan.prefill
                   if seq.key is None or seq.key not in failed_keys]
        for seq, count in self._prefill_together(prefill, result):
            try:
                self._prefill(seq, count, result)
            except Exception as exc:  # one request's forward: it fails alone
                log.warning("prefill failed", extra={"request_id": seq.request_id,
                                                     "adapter": seq.key, "error": repr(exc)})
                seq.cache = None
                result.failed.append((seq, _row_error(exc, "prefill")))
        gone = set(result.finished) | {seq for seq, _ in result.failed}
        if gone:
            self._keep(gone)
        return result

    def clear(self) -> None:
        self.main = Group(self._batch_cache())

    # --- KV budget (read and decided on the loop while no step runs) --------------------
    def kv_in_use(self) -> int:
        """Token positions the running rows hold (every group), rounded up to blocks."""
        g = self.main
        return len(g.rows) * self.budget.blocks(g.cache.width) * self.budget.block

    def kv_rows(self) -> int:
        """What paged blocks would hold for the running rows: each row's length rounded up
        to blocks, summed (the slab's area, :meth:`kv_in_use`, is at least this)."""
        return sum(self.budget.blocks(n) * self.budget.block for n in self.main.cache.lengths)

    def width(self) -> int:
        """The longest running row of the slot-pool group."""
        return self.main.cache.width

    def overflow(self, gone: set[Row], held: int = 0) -> list[Row]:
        """The newest rows of the slot-pool group to preempt so the next decode step fits
        the KV budget beside ``held`` positions held elsewhere (rows still prefilling; rows
        in ``gone`` leave anyway). One row always fits: the context limit is within the
        budget."""
        others = held
        lengths = dict(zip(map(id, self.main.rows), self.main.cache.lengths, strict=True))
        rows = sorted((s for s in self.main.rows if s not in gone), key=lambda s: s.order)
        chosen: list[Row] = []
        while len(rows) > 1:
            width = max(lengths[id(s)] for s in rows)
            if others + self.budget.area(len(rows), width) <= self.budget.tokens:
                break
            chosen.append(rows.pop())
        return chosen

    # --- forwards -----------------------------------------------------------------------
    def _decode_group(self, group: Group, result: StepResult) -> None:
        """One decode forward of ``group``. A failed forward leaves the batch cache as it
        was (the grown cache is only taken back on success), so it is retried once (a
        transient device OOM, say); if it fails again, the group's rows fail."""
        try:
            logits = self._decode_forward(group)  # [B, V]
        except Exception as first:
            log.warning("decode forward failed; retrying once",
                        extra={"rows": len(group.rows), "error": repr(first)})
            try:
                logits = self._decode_forward(group)
            except Exception as exc:
                log.exception("decode forward failed twice", extra={"rows": len(group.rows)})
                error = StepError(f"forward step failed: {exc!r}")
                result.failed.extend((seq, error) for seq in group.rows)
                return
        rows = group.rows
        picked = pick_batch(logits, [s.sampler for s in rows])  # one host transfer
        for i, seq in enumerate(rows):
            self._take(seq, picked, i, result, "decode")
        result.decode_rows += len(rows)
        result.request_ids.extend(s.request_id for s in rows)
        result.adapters.extend(s.key for s in rows)
        result.merged.extend(s.hot for s in rows)

    def _decode_forward(self, group: Group) -> torch.Tensor:
        rows = group.rows
        ids = torch.tensor([[s.last_token] for s in rows], dtype=torch.long,
                           device=self.base.device)  # [B, 1]
        inputs = group.cache.step_inputs()
        with self._route(rows):  # slot per row [B]
            out = self.model(input_ids=ids, **inputs.kwargs())
        group.cache.advance()
        return out.logits[:, -1, :]  # type: ignore[no-any-return]  # [B, V]

    def _prefill_together(self, prefill: list[tuple[Row, int]], result: StepResult
                          ) -> list[tuple[Row, int]]:
        """Prefill in ONE forward every joining row whose whole prompt runs this step (the
        slot pool's rows, hot or not); returns the rest, for one forward
        each. If that forward fails, its rows go back to the rest: each then fails alone,
        or not at all."""
        # side by side by slot: each adapter's tokens are one run the banks read as a view
        whole = sorted((seq for seq, count in prefill
                        if seq.prefilled == 0 and count == len(seq.pending)),
                       key=lambda seq: seq.slot)
        if len(whole) < 2:
            return prefill
        try:
            logits, kv = self._prefill_forward(whole)
        except Exception as exc:
            log.warning("batched prefill failed; prefilling its rows one by one",
                        extra={"rows": len(whole), "error": repr(exc)})
            return prefill
        sampled = [b for b, s in enumerate(whole) if s.resume is None]  # recomputed: none
        picked = pick_batch(logits[sampled], [whole[b].sampler for b in sampled]) \
            if sampled else None  # one host transfer
        for b, seq in enumerate(whole):
            length = len(seq.pending)
            seq.prefilled = length
            result.prefill_tokens += length
            result.request_ids.append(seq.request_id)
            result.adapters.append(seq.key)
            result.merged.append(seq.hot)
            if picked is None or seq.resume is not None or (
                    self._take(seq, picked, sampled.index(b), result, "prefill")
                    and seq.finish is None):
                self._join(seq, [(k[b:b + 1], v[b:b + 1]) for k, v in kv], length, result)
        done = set(whole)
        return [(seq, count) for seq, count in prefill if seq not in done]

    def _prefill_forward(self, rows: list[Row]) -> tuple[torch.Tensor, list[KV]]:
        """Whole prompts of ``rows`` as one right-padded batch ``[B, W]``: each row attends
        causally to its own tokens only (a 4-D mask), at its real positions. Returns each
        row's last-token logits ``[B, V]`` and the per-layer keys/values ``[B, H, W, D]``
        (padding beyond each row's length is dropped when the rows join)."""
        device, dtype = self.base.device, self.base.dtype
        lengths = [len(s.pending) for s in rows]
        width = max(lengths)
        ids = torch.tensor([s.pending + [0] * (width - len(s.pending)) for s in rows],
                           dtype=torch.long, device=device)  # [B, W]
        span = torch.arange(width, device=device)  # [W]
        real = span.unsqueeze(0) < torch.tensor(lengths, device=device).unsqueeze(1)  # [B, W]
        causal = span.unsqueeze(1) >= span.unsqueeze(0)  # [W, W]: query q sees keys <= q
        attend = causal.unsqueeze(0) & real.unsqueeze(1)  # [B, W, W]
        mask = torch.zeros(attend.shape, dtype=dtype, device=device).masked_fill(
            ~attend, torch.finfo(dtype).min).unsqueeze(1)  # [B, 1, W, W] additive
        last = sorted({n - 1 for n in lengths})  # positions whose logits are needed
        cache = DynamicCache()
        with self._route(rows, width):  # slot per token [B, W]
            out = self.model(input_ids=ids, attention_mask=mask,
                             position_ids=span.unsqueeze(0).expand(len(rows), width),
                             cache=cache, use_cache=True,
                             logits_to_keep=torch.tensor(last, device=device))
        column = torch.tensor([last.index(n - 1) for n in lengths], device=device)  # [B]
        logits = out.logits[torch.arange(len(rows), device=device), column]  # [B, V]
        return logits, cache_tensors(cache)

    def _prefill(self, seq: Row, count: int, result: StepResult) -> None:
        start = seq.prefilled
        chunk = seq.pending[start:start + count]
        if seq.cache is None:
            seq.cache = DynamicCache()
        ids = torch.tensor([chunk], dtype=torch.long, device=self.base.device)  # [1, T]
        positions = torch.arange(start, start + len(chunk),
                                 device=self.base.device).unsqueeze(0)  # [1, T]
        with self._route([seq], len(chunk)):  # [1, T]
            out = self.model(input_ids=ids, position_ids=positions, cache=seq.cache,
                        use_cache=True, logits_to_keep=1)
        seq.prefilled += len(chunk)
        result.prefill_tokens += len(chunk)
        result.request_ids.append(seq.request_id)
        result.adapters.append(seq.key)
        result.merged.append(seq.hot)
        if seq.prefilled < len(seq.pending):
            return
        if seq.resume is not None or (  # a recomputed row samples nothing
                self._take(seq, pick_batch(out.logits[0, -1:], [seq.sampler]), 0, result,
                           "prefill") and seq.finish is None):  # logits [1, V]
            self._join(seq, cache_tensors(seq.cache), len(seq.pending), result)
        seq.cache = None  # the batch cache holds a copy now

    def _join(self, seq: Row, kv: list[KV], length: int, result: StepResult) -> None:
        """A prefilled row joins its group's batch cache (``kv``: ``[1, H, >= length, D]``
        per layer); a recomputed row goes on decoding from its last token."""
        group = self.main
        group.cache.add(kv, length)
        group.rows.append(seq)
        seq.resume = None
        result.joined.append(seq)

    def _take(self, seq: Row, picked: Picked, i: int, result: StepResult, stage: str) -> bool:
        """Row ``i`` of ``picked`` for ``seq``: its token is emitted (True), or its own
        failure (non-finite logits, stop strings, detokenizing) fails it alone (False)."""
        try:
            if picked.bad[i]:
                raise NonFiniteLogitsError()
            self._emit(seq, picked.tokens[i], picked.logprobs[i], picked.top[i], result)
        except Exception as exc:
            log.warning("row failed", extra={"request_id": seq.request_id,
                                             "adapter": seq.key, "error": repr(exc)})
            result.failed.append((seq, _row_error(exc, stage)))
            return False
        return True

    def _emit(self, seq: Row, token: int, logprob: float,
              top: tuple[tuple[int, float], ...], result: StepResult) -> None:
        seq.completion += 1
        seq.last_token = token
        seq.generated.append(token)
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
            prompt_tokens=len(seq.prompt), completion_tokens=seq.completion,
            logprob=logprob, top_logprobs=top)))

    def _keep(self, gone: set[Row]) -> None:
        """Remove ``gone`` rows from the batch."""
        if any(s in gone for s in self.main.rows):
            self.main.keep([s for s in self.main.rows if s not in gone])


def _row_error(exc: Exception, stage: str) -> RowError:
    """``exc`` as the row's own error (a RowError passes through unchanged)."""
    if isinstance(exc, RowError):
        return exc
    error = RowError(f"generation failed during {stage}: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error
