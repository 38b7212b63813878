"""The running batch's KV cache: one slab per layer, written in place, never concatenated.

Layout. Per layer, keys and values live in a preallocated slab ``[R, H_kv, C, D]`` (``R``
row capacity, ``C`` length capacity). Running row ``i`` owns slab row ``i`` (rows are
kept compact in ``[0, B)``), its tokens at positions ``[0, length_i)``: right-aligned
padding, never left padding, so a row's position ids are its real positions.

Costs.
- A step writes each decode row's new key/value at ``[i, :, length_i]`` in place (inside
  the model's attention, through :class:`PackedLayer`) and attends over the view
  ``[:B, :, :W + 1]`` (``W`` the longest row): no copy of the cache at all. The previous
  design (one left-padded tensor pair, grown by ``torch.cat``) copied the whole cache per
  layer per step — 34% of a decode step's samples; measured per layer at batch 32,
  length 170, 16 heads x 64 on the 2-core CPU: 16.5 ms (cat) vs 3.0 ms (slab), identical
  outputs.
- A row still prefilling keeps its own keys/values (``[1, H, prefilled, D]`` per layer,
  extended by each chunk of the packed step: :class:`ChunkKV`); when its prompt is done it
  joins: copied once into its slab row (``O(its length)``); rows that leave
  are compacted by moving the later rows down (``O(moved rows x W)``, only on leaves).
- Capacity grows by doubling (rows and length), so memory follows use, amortised O(1)
  per step; nothing is preallocated for the context limit.
- Attention over the view spans ``W + 1`` positions for every row; where one long row
  would make short rows pay for its length, :mod:`tessera.engine.attention` groups the
  step's attention by row length (the short rows stay a view; the long ones are read
  over their own widths).

Budget. The cache is bounded: :class:`KVBudget` counts the slab area a decode step holds
(``B x (W + 1)`` token positions per layer, rounded up to blocks of ``block`` positions)
against ``tokens`` (``TESSERA_KV_CACHE_TOKENS``), and the slabs never grow past it. When the
running rows would outgrow it, the scheduler preempts the newest row: it leaves the batch
and is recomputed later from its prompt and the tokens it already produced (same tokens,
no error). Why a slab and not paged blocks on this path: without a paged-attention kernel
(none runs on the CPU), attention over blocks must first gather each row's blocks into a
contiguous ``[B, H, W, D]`` tensor every layer of every step, the very copy the slab
removed; a paged kernel is where blocks pay. The engine's Triton decode kernel
(:mod:`tessera.engine.ops`, CUDA) reads slab rows by stride today; a block table is the
step it lacks to read blocks instead.
Measured (``python -m bench.kv_layout --reps 12``: the decode attention of 8 layers, 32
rows, 16 heads x 64, fp32, 2 threads; the best paged form found — token-major block pools,
rows cut into groups whose gathered keys stay in the last-level cache, a preallocated
workspace; 2026-12-01, the 2-core AMD EPYC VM): rows of equal length (the usual decode)
1.32-1.49x the slab's time, mixed lengths (131-252) 0.99-1.01x, 31 short rows beside a
1,024-token row 0.95-1.12x. Attention is a fifth to a third of a decode step here, so
paged blocks would cost the common step ~6-15% for tighter memory and no copy on joins
and leaves (rare events, ``O(length)`` each).

A forward that fails half way leaves some layers' new keys written past ``length_i``; as
lengths only advance after a successful step, those writes are never read (the step is
retried from the same state); a chunk's extended keys are only taken by its row then too.

Only full-attention layers are supported (``DynamicLayer``); sliding-window or hybrid
caches (Gemma 2, some Mistral configs) are not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tessera.adapters.ops import Backend
from tessera.adapters.plan import on_device
from tessera.engine.attention import Chunk, LayerKV, PackedPlan, plan

KV = tuple[torch.Tensor, torch.Tensor]  # ([B, H_kv, L, D], [B, H_kv, L, D])

_MIN_LENGTH = 64  # initial length capacity


class KVBudget:
    """How many token positions (per layer) the running batch's KV cache may hold."""

    def __init__(self, tokens: int, block: int) -> None:
        if block < 1 or tokens < block:
            raise ValueError(f"KV budget of {tokens} tokens in blocks of {block}")
        self.tokens = tokens
        self.block = block

    def blocks(self, length: int) -> int:
        return -(-length // self.block)

    def area(self, rows: int, width: int) -> int:
        """Positions a decode step of ``rows`` rows, the longest ``width`` tokens, holds
        (its new token included), rounded up to blocks."""
        return rows * self.blocks(width + 1) * self.block if rows else 0

    def fits(self, rows: int, width: int) -> bool:
        return self.area(rows, width) <= self.tokens


def _cat(past: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if past is None else torch.cat([past, new], dim=2)


class PackedLayer(DynamicLayer):
    """One layer of a packed step. ``update`` takes the step's new keys/values
    ``[1, H_kv, T, D]``, writes each decode row's (at its packed position) in place in the
    slab at its own length, extends each chunk's row with its own, and leaves what
    attention reads in ``kv`` (slab views, no copy; a chunk's row keys/values)."""

    def __init__(self, slab: KV | None, lengths: torch.Tensor, index: torch.Tensor,
                 width: int, chunks: list[tuple[int, int, KV | None]], kv: LayerKV) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.slab = slab  # ([R, H, C, D], [R, H, C, D]); None without decode rows
        self.lengths = lengths  # [B] long: where each decode row's new token goes
        self.index = index  # [B] long: slab row i's token in the packed sequence
        self.rows = torch.arange(int(lengths.shape[0]), device=lengths.device)  # [B]
        self.width = width  # W: the longest decode row before this step
        self.chunks = chunks  # (start, length, the row's keys/values so far or None)
        self.kv = kv

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor,
                            *args: object, **kwargs: object) -> None:
        """As ``DynamicLayer``'s, without its ``torch.tensor([])`` (a tensor made from host
        data inside the forward: a copy to the device, none in a captured step)."""
        self.device = key_states.device
        self.keys, self.values = key_states.new_empty(0), value_states.new_empty(0)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b = int(self.rows.shape[0])
        if b:
            assert self.slab is not None
            keys, values = self.slab  # [R, H, C, D]
            keys[self.rows, :, self.lengths] = key_states[0].index_select(  # [B, H, D]
                1, self.index).transpose(0, 1)
            values[self.rows, :, self.lengths] = value_states[0].index_select(
                1, self.index).transpose(0, 1)
            self.kv.decode = (keys[:b, :, :self.width + 1],  # [B, H, W + 1, D] views
                              values[:b, :, :self.width + 1])
        self.kv.chunks = [
            (_cat(None if past is None else past[0], key_states[:, :, start:start + n]),
             _cat(None if past is None else past[1], value_states[:, :, start:start + n]))
            for start, n, past in self.chunks]  # [1, H, past + n, D] each
        self.keys, self.values = key_states, value_states
        return key_states, value_states


@dataclass(frozen=True)
class ChunkKV:
    """A prefill chunk of one row in a packed step: ``length`` tokens at packed position
    ``start``; the row's keys/values so far (per layer ``[1, H, past, D]``; None: none)."""

    start: int
    length: int
    past: list[KV] | None

    @property
    def past_length(self) -> int:
        return 0 if self.past is None else int(self.past[0][0].shape[2])


@dataclass(frozen=True)
class PackedInputs:
    """What one packed step hands the model besides its token ids and positions."""

    cache: DynamicCache  # PackedLayer per layer
    plan: PackedPlan
    device: torch.device
    dtype: torch.dtype

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the model's forward. The attention mask is a placeholder:
        a 4-D mask makes transformers skip building its own ([T, T + past] per step); the
        plan holds the real ones and reaches the attention."""
        mask = torch.zeros((1, 1, 1, 1), dtype=self.dtype, device=self.device)
        return {"attention_mask": mask, "cache": self.cache, "use_cache": True,
                "packed_plan": self.plan}

    def chunk_kv(self, i: int) -> list[KV]:
        """After the forward: chunk ``i``'s row keys/values per layer ``[1, H, past + n, D]``."""
        return [layer.chunks[i] for layer in self.plan.kv]


class BatchCache:
    def __init__(self, limit: int | None = None, *, grouped: bool = True,
                 kernel: Backend = "torch") -> None:
        self.limit = limit  # most token positions (rows x length) the slabs may allocate
        self.grouped = grouped  # the model runs tessera.engine.attention: plan by length
        self.kernel = kernel  # decode attention's backend: "triton" reads lengths itself
        self.generation = 0  # bumped whenever the slabs are new tensors (captured graphs
        # read them by address: tessera.engine.graphs)
        self.clear()

    def clear(self) -> None:
        self.layers: list[KV] = []  # per layer (keys, values) slabs [R, H_kv, C, D]
        self.lengths: list[int] = []  # real tokens per row (its next position id)
        self.generation += 1

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        """The longest row (the attention span of a decode step, before its new token)."""
        return max(self.lengths, default=0)

    @property
    def capacity(self) -> tuple[int, int]:
        """(rows, length) the slabs hold without growing."""
        if not self.layers:
            return 0, 0
        return int(self.layers[0][0].shape[0]), int(self.layers[0][0].shape[2])

    def _reserve(self, rows: int, length: int, like: list[KV]) -> None:
        """Grow the slabs (doubling) to hold ``rows`` rows of ``length`` tokens."""
        have_rows, have_length = self.capacity
        if self.layers and rows <= have_rows and length <= have_length:
            return
        # only the dimension that is short grows (doubling both whenever either was short
        # took 32 rows of 170 tokens to a 64 x 5,472 slab)
        new_rows = have_rows if rows <= have_rows else max(rows, 2 * have_rows, 1)
        new_length = (have_length if length <= have_length
                      else max(length, 2 * have_length, _MIN_LENGTH))
        if self.limit is not None and new_rows * new_length > self.limit:  # never past it
            new_length = max(length, min(new_length, self.limit // new_rows))
            new_rows = max(rows, min(new_rows, self.limit // new_length))
        grown: list[KV] = []
        for i, (k, v) in enumerate(like):
            shape = (new_rows, k.shape[1], new_length, k.shape[3])  # [R, H, C, D]
            gk = torch.zeros(shape, dtype=k.dtype, device=k.device)
            gv = torch.zeros(shape, dtype=v.dtype, device=v.device)
            if self.layers and self.rows:
                old_k, old_v = self.layers[i]
                b, w = self.rows, self.width
                gk[:b, :, :w] = old_k[:b, :, :w]
                gv[:b, :, :w] = old_v[:b, :, :w]
            grown.append((gk, gv))
        self.layers = grown
        self.generation += 1

    def reserve(self, rows: int, length: int) -> None:
        """Hold ``rows`` rows of ``length`` tokens without growing (a static step's padded
        rows write their keys into free slab rows ``[B, rows)``); needs a row already."""
        if not self.layers:
            raise ValueError("no slab yet: add a row first")
        self._reserve(rows, length, self.layers)

    def add(self, row: list[KV], length: int) -> None:
        """Append one prefilled row (``[1, H, length, D]`` per layer) as the last row."""
        self._reserve(self.rows + 1, max(self.width, length) + 1, self.layers or row)
        i = self.rows
        for (k, v), (rk, rv) in zip(self.layers, row, strict=True):
            k[i, :, :length] = rk[0, :, :length]
            v[i, :, :length] = rv[0, :, :length]
        self.lengths.append(length)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order, ascending): later rows move down into the
        holes, so the running rows stay compact in ``[0, B)``."""
        if not rows:
            self.lengths = []
            return
        width = self.width
        for j, r in enumerate(rows):
            if r != j:
                for k, v in self.layers:
                    k[j, :, :width] = k[r, :, :width]
                    v[j, :, :width] = v[r, :, :width]
        self.lengths = [self.lengths[r] for r in rows]

    def packed(self, decode: list[int], chunks: list[ChunkKV], layers: int,
               device: torch.device, dtype: torch.dtype) -> PackedInputs:
        """The cache and attention plan of one packed step over ``layers`` layers: one new
        token of every row, row ``i``'s at packed position ``decode[i]`` (``[]``: no decode
        tokens), and ``chunks``. The decode part's additive mask is 0 where a row attends
        (its tokens and its new one) and the dtype's minimum elsewhere; with ``grouped``,
        its attention is grouped by row length. On the Triton kernel (``kernel``) there is
        neither: it reads each row's length on the device."""
        if decode and len(decode) != self.rows:
            raise ValueError(f"{len(decode)} decode positions for {self.rows} rows")
        rows = len(decode)
        index = on_device(decode, device, torch.long)  # [B]
        slabs: list[KV | None] = [None] * layers
        lengths = on_device(self.lengths[:rows], device, torch.long)  # [B]
        width = self.width if rows else 0
        mask: torch.Tensor | None = None
        groups = None
        if rows:
            self._reserve(self.rows, width + 1, self.layers)
            slabs = list(self.layers)
        if rows and self.kernel == "torch":
            span = torch.arange(width + 1, device=device).unsqueeze(0)  # [1, W + 1]
            attend = span <= lengths.unsqueeze(1)  # [B, W + 1]: its tokens and the new one
            mask = torch.zeros(attend.shape, dtype=dtype, device=device).masked_fill(
                ~attend, torch.finfo(dtype).min)[:, None, None, :]  # [B, 1, 1, W + 1]
            groups = plan(self.lengths, device, dtype) if self.grouped else None
        kv = tuple(LayerKV() for _ in range(layers))
        cache = DynamicCache()
        for i in range(layers):
            cache.layers.append(PackedLayer(
                slabs[i], lengths, index, width,
                [(c.start, c.length, None if c.past is None else c.past[i]) for c in chunks],
                kv[i]))
        spec = tuple(Chunk(c.start, c.length, _chunk_mask(c.length, c.past_length, device,
                                                          dtype)) for c in chunks)
        return PackedInputs(cache, PackedPlan(index, mask, groups, spec, kv, lengths,
                                              self.kernel), device, dtype)

    def static(self, rows: int, index: torch.Tensor, lengths: torch.Tensor, layers: int,
               device: torch.device, dtype: torch.dtype) -> PackedInputs:
        """The cache and plan of a decode-only step over ``rows`` slab rows (the running
        ones, then padding rows) whose device inputs are the caller's buffers: ``index``
        ``[rows]`` (slab row ``i``'s packed position) and ``lengths`` ``[rows]``. Attention
        runs the Triton decode kernel, which reads the lengths on the device, so nothing
        here depends on them: the step a CUDA graph captures once and replays
        (:mod:`tessera.engine.graphs`). The slabs must hold ``rows`` rows (:meth:`reserve`)."""
        kv = tuple(LayerKV() for _ in range(layers))
        cache = DynamicCache()
        width = self.capacity[1] - 1  # the views span the slab: the kernel reads lengths
        for i in range(layers):
            cache.layers.append(PackedLayer(self.layers[i], lengths, index, width, [], kv[i]))
        return PackedInputs(cache, PackedPlan(index, None, None, (), kv, lengths, "triton"),
                            device, dtype)

    def advance(self) -> None:
        """After a successful decode step: every row grew by its new token."""
        self.lengths = [n + 1 for n in self.lengths]


def _chunk_mask(n: int, past: int, device: torch.device, dtype: torch.dtype
                ) -> torch.Tensor | None:
    """``[1, 1, n, past + n]`` additive: query ``q`` attends to keys ``<= past + q``; None
    where SDPA's own causal rule is that (no past) or nothing is masked (one token)."""
    if past == 0 or n == 1:
        return None
    keys = torch.arange(past + n, device=device).unsqueeze(0)  # [1, past + n]
    queries = torch.arange(past, past + n, device=device).unsqueeze(1)  # [n, 1]
    mask = torch.zeros((n, past + n), dtype=dtype, device=device)
    return mask.masked_fill(keys > queries, torch.finfo(dtype).min)[None, None]
