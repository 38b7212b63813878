"""One scheduler step, run in the forward thread: slot writes, then ONE forward over a
packed token sequence — the next token of every running row (every adapter and method,
a slot id per token) followed by the prompt chunks of joining rows (chunked prefill; a
row's chunk attends to its earlier chunks' keys) — then sampling of every row that needs
a token in one host transfer, and detokenization. No padding: each token runs at its own
row's position (:mod:`tessera.engine.attention` splits the attention by part). The
step's inputs, its attention plan, the adapters' routing and the sampling parameters are
built on the host and uploaded without waiting (``on_device``): on a GPU the host queues
the whole step, and its one wait is the sampled tokens' transfer
(``tests/engine/test_no_host_sync.py``). A decode-only step whose rows all use LoRA,
rsLoRA, DoRA, HRA or no adapter runs as a static step instead where the engine has them
(:mod:`tessera.engine.graphs`: on CUDA a replayed CUDA graph, padded to its size).

Rows of the hot adapter admitted while its merge is installed (:mod:`tessera.engine.hot`)
have ``Row.hot`` set: they hold no slot and run on the merged weights, in the same forward
and the same KV cache as every other row (the others get the hot delta taken back). The
step installs the merge the scheduler planned before any forward.

The event loop never touches the state below while a step runs; the step never touches
the scheduler's queues. Each step returns the events to deliver.

Failures are contained where they belong: a row whose sampling, stop strings,
detokenization or logits (NaN from its adapter) fail is dropped from the batch and reported
in ``StepResult.failed`` with a :class:`~tessera.engine.errors.RowError`. Rows change only
after the forward succeeded, so a failed packed forward is run again in parts: the decode
rows in one forward (the retry; if it fails too, those rows fail with a
:class:`~tessera.engine.errors.StepError`), then each prefill chunk in its own (a failure
is that request's).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from tessera.adapters import SlotPool
from tessera.adapters.ops import Backend
from tessera.adapters.plan import on_device
from tessera.engine.detok import TextStream
from tessera.engine.errors import RowError, StepError
from tessera.engine.graphs import DecodeGraphs
from tessera.engine.hot import Merge
from tessera.engine.kvcache import KV, BatchCache, ChunkKV, KVBudget, PackedInputs
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
    prefilled: int = 0  # prompt tokens already in ``kv``
    kv: list[KV] | None = None  # its keys/values per layer [1, H, prefilled, D] while prefilling
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
        self.kv = None


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


@dataclass(frozen=True)
class Forward:
    """A packed forward that succeeded: what its rows take (:meth:`Stepper._apply`)."""

    running: list[Row]  # decode rows, in slab order
    chunks: list[tuple[Row, int]]  # (row, prompt tokens), in the plan's order
    inputs: PackedInputs | None  # the chunks' rows' keys/values (None: a static step)
    picked: Picked | None  # decode rows first, then the rows of ``sampled``
    sampled: dict[int, int]  # chunk index -> its row in ``picked`` (prompt done, sampled)


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

    def __init__(self, base: LoadedModel, pool: SlotPool, budget: KVBudget,
                 attention: Backend = "torch", graphs: DecodeGraphs | None = None) -> None:
        self.base = base
        self.pool = pool
        self.budget = budget
        self.attention = attention  # decode attention's backend (tessera.engine.ops)
        self.graphs = graphs  # static decode steps (CUDA graphs); None: every step eager
        self.model = base.model
        self.main = Group(self._batch_cache())
        self.hot_key: str | None = None  # adapter of the hot merge installed in the pool

    def _batch_cache(self) -> BatchCache:
        return BatchCache(limit=self.budget.tokens, kernel=self.attention)

    @property
    def running(self) -> list[Row]:
        return list(self.main.rows)

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
        chunks = [(seq, count) for seq, count in plan.prefill
                  if seq.key is None or seq.key not in failed_keys]
        decode = bool(self.main.rows)
        if decode or chunks:
            try:
                done = self._forward(decode, chunks)
            except Exception as exc:  # no row changed: run the parts on their own
                log.warning("packed step failed; running its parts on their own",
                            extra={"rows": len(self.main.rows), "chunks": len(chunks),
                                   "error": repr(exc)})
                self._run_apart(decode, chunks, result)
            else:
                self._apply(done, result)
        gone = set(result.finished) | {seq for seq, _ in result.failed}
        if gone:
            self._keep(gone)
        return result

    def _run_apart(self, decode: bool, chunks: list[tuple[Row, int]],
                   result: StepResult) -> None:
        """After a failed packed step: the decode rows in one forward (the retry: if it
        fails too, those rows fail), then each chunk in its own (if it fails, its row)."""
        if decode:
            try:
                done = self._forward(True, [])
            except Exception as exc:
                log.exception("decode forward failed twice", extra={"rows": len(self.main.rows)})
                error = StepError(f"forward step failed: {exc!r}")
                result.failed.extend((seq, error) for seq in self.main.rows)
            else:
                self._apply(done, result)
        for seq, count in chunks:
            try:
                done = self._forward(False, [(seq, count)])
            except Exception as exc:  # one request's forward: it fails alone
                log.warning("prefill failed", extra={"request_id": seq.request_id,
                                                     "adapter": seq.key, "error": repr(exc)})
                result.failed.append((seq, _row_error(exc, "prefill")))
            else:
                self._apply(done, result)

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

    # --- the packed forward ---------------------------------------------------------------
    def _forward(self, decode: bool, chunks: list[tuple[Row, int]]) -> Forward:
        """ONE forward over a flat token sequence: the next token of every running row
        (``decode``), then ``count`` prompt tokens of each prefilling row, each token at its
        row's position with its row's slot; one host transfer samples every row that needs
        a token. Changes no row: if it raises, the step can run again."""
        running = self.main.rows if decode else []
        b = len(running)
        # one run per adapter slot (its decode rows, then its chunks), keyed (slot, hot):
        # the banks read a slot's run as a view, where scattered tokens would be gathered
        groups: dict[tuple[int, bool], tuple[list[int], list[int]]] = {}
        for i, seq in enumerate(running):
            groups.setdefault((seq.slot, seq.hot), ([], []))[0].append(i)
        for j, (seq, _) in enumerate(chunks):
            groups.setdefault((seq.slot, seq.hot), ([], []))[1].append(j)
        tokens: list[int] = []
        positions: list[int] = []
        rows: list[Row] = []  # per token: its row
        at = [0] * b  # slab row i's token in the packed sequence
        starts = [0] * len(chunks)
        lengths = self.main.cache.lengths
        # the hot merge's rows first: every other token is then one run, which the layers'
        # correction reads and writes as views (``Routing.cold_span``)
        for key in sorted(groups, key=lambda k: (not k[1], k[0])):
            decoding, chunked = groups[key]
            for i in decoding:
                at[i] = len(tokens)
                tokens.append(running[i].last_token)
                positions.append(lengths[i])
                rows.append(running[i])
            for j in chunked:
                seq, count = chunks[j]
                starts[j], start = len(tokens), seq.prefilled
                tokens.extend(seq.pending[start:start + count])
                positions.extend(range(start, start + count))
                rows.extend([seq] * count)
        specs = [ChunkKV(starts[j], count, seq.kv) for j, (seq, count) in enumerate(chunks)]
        sampled = [i for i, (seq, count) in enumerate(chunks)  # prompt done (not recomputed)
                   if seq.prefilled + count == len(seq.pending) and seq.resume is None]
        if not chunks and self.graphs is not None:  # decode only: a static step?
            slots = [s.slot for s in rows]
            n = self.graphs.size(self.main.cache, slots)
            found = None if n is None else self.graphs.run(self.main.cache, n, tokens,
                                                           positions, slots, at)
            if found is not None:  # [B, V], slab order
                return Forward(running, [], None,
                               pick_batch(found, [s.sampler for s in running]), {})
        keep = at + [specs[i].start + specs[i].length - 1 for i in sampled]
        device = self.base.device
        inputs = self.main.cache.packed(at, specs, self.base.layers, device, self.base.dtype)
        ids = on_device([tokens], device, torch.long)  # [1, T]
        with self.pool.use(torch.tensor([[s.slot for s in rows]]),  # slot per token [1, T]
                           hot=[s.hot for s in rows] if self.hot_key else None):
            out = self.model(input_ids=ids, position_ids=on_device([positions], device),
                             logits_to_keep=on_device(keep, device, torch.long),
                             **inputs.kwargs())
        logits = out.logits[0]  # [K, V]: decode rows (slab order), then the sampled chunks
        samplers = [s.sampler for s in running] + [chunks[i][0].sampler for i in sampled]
        picked = pick_batch(logits, samplers) if samplers else None  # one host transfer
        return Forward(running, chunks, inputs, picked,
                       {i: b + k for k, i in enumerate(sampled)})

    def _apply(self, done: Forward, result: StepResult) -> None:
        """The rows of a successful forward take their tokens; rows finishing their prompt
        join the batch cache (a join that fails — no memory for the slab — fails its row)."""
        picked = done.picked
        if done.running:
            assert picked is not None
            self.main.cache.advance()
            for i, seq in enumerate(done.running):
                self._take(seq, picked, i, result, "decode")
            result.decode_rows += len(done.running)
            self._record(done.running, result)
        for i, (seq, count) in enumerate(done.chunks):
            seq.prefilled += count
            assert done.inputs is not None  # a step with chunks ran eagerly
            seq.kv = done.inputs.chunk_kv(i)
            result.prefill_tokens += count
            self._record([seq], result)
            if seq.prefilled < len(seq.pending):
                continue
            row = done.sampled.get(i)
            if row is None or (  # a recomputed row samples nothing
                    picked is not None and self._take(seq, picked, row, result, "prefill")
                    and seq.finish is None):
                try:
                    self._join(seq, seq.kv, len(seq.pending), result)
                except Exception as exc:
                    log.warning("join failed", extra={"request_id": seq.request_id,
                                                      "error": repr(exc)})
                    result.failed.append((seq, _row_error(exc, "prefill")))
            seq.kv = None  # the batch cache holds a copy now

    @staticmethod
    def _record(rows: list[Row], result: StepResult) -> None:
        result.request_ids.extend(s.request_id for s in rows)
        result.adapters.extend(s.key for s in rows)
        result.merged.extend(s.hot for s in rows)

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
