"""Per-forward routing: which slot each token uses, computed once and read by every layer.

HF modules pass nothing extra down to their projections, so the routing reaches the
layers through :class:`StepMeta`: one object per slot pool, held by every wrapped layer
(vLLM's punica-wrapper pattern), written once per step before the forward and cleared
after it. The slot ids sit in a device buffer the pool preallocates and reuses.

The host never reads the device: the caller hands the slot ids in on the host (the engine
knows them there), every host-side decision (distinct slots, token counts, runs) is taken
from that host copy, and every index tensor the banks use is built on the host and copied
to the device asynchronously (:func:`upload`). No step waits on the device: on a GPU the
forward's kernels queue without a stall (the precondition of capturing a step in a CUDA
graph). ``tests/test_no_host_sync.py`` checks it by routing a mixed batch of every method
on the ``meta`` device, where any read of a device value raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch

from tessera.adapters import kernels
from tessera.adapters.errors import PoolError

# Segment mode reads a slot's tokens as views of the batch (no gather) when they lie in
# one run, or in at most MAX_SPANS runs of MIN_RUN tokens on average (Routing.views).
MAX_SPANS = 4
MIN_RUN = 8


def upload(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``: itself on the CPU, elsewhere an asynchronous copy (the
    host does not wait for the device's queued work)."""
    return values if values.device == device else values.to(device, non_blocking=True)


def on_device(data: Any, device: torch.device, dtype: torch.dtype | None = None
              ) -> torch.Tensor:
    """``torch.tensor(data, dtype=dtype)`` on ``device`` through :func:`upload`: unlike
    ``torch.tensor(data, device=...)`` (a blocking copy: on CUDA the host waits for every
    queued kernel), the host goes on queueing work."""
    return upload(torch.tensor(data, dtype=dtype), device)


@dataclass(frozen=True)
class Segments:
    """The tokens of a list of ``U`` active slots grouped by slot and padded to the longest
    group ``L``: padded row ``u * L + j`` holds the ``j``-th token of ``active[u]``. The
    SGMV-like forms run ``[U, L, *]`` batched matmuls on it (one adapter per batch entry)."""

    length: int  # L: tokens of the largest group (every group is padded to it)
    src: torch.Tensor  # [U L] token each padded row reads (padding repeats a group's token)
    rows: torch.Tensor  # [M] padded row of each token of ``tokens`` (of token i if None)
    tokens: torch.Tensor | None  # [M] tokens that use an active slot; None = all N, in order
    # ``(start, stop)`` where the padded layout IS tokens [start, stop) of the batch (each
    # active slot one run of L tokens, runs consecutive in ``active`` order: a decode step
    # whose rows share the slots evenly): the forms read and write it as views, no gather
    block: tuple[int, int] | None = None


@dataclass(frozen=True)
class Groups:
    """The tokens of a list of ``U`` active slots sorted by slot, unpadded (SGMV's layout,
    what a kernel reading the banks by slot id takes): group ``u`` is the tokens
    ``order[starts[u]:starts[u] + lengths[u]]``, all of slot ``slots[u]``."""

    order: torch.Tensor  # [M] token of each sorted position
    slots: torch.Tensor  # [U] slot of each group
    starts: torch.Tensor  # [U] first sorted position of each group
    lengths: torch.Tensor  # [U] tokens of each group
    longest: int  # the largest group (host side: sizes a kernel's grid)


@dataclass(frozen=True)
class HotDelta:
    """One module's share of a hot merge (dLoRA): ``weight = W0 + up @ down`` in the base's
    dtype and ``F.linear`` layout, a buffer beside W0 (never written into it). Tokens of the
    hot adapter run on it with no adapter work; every other token of the forward gets
    ``- up (down x)`` back, so it computes exactly ``W0 x`` before its own adapter."""

    weight: torch.Tensor  # [out, in]
    down: torch.Tensor  # [r, in]
    up: torch.Tensor  # [out, r], the adapter's scale folded in
    packed: torch.Tensor | None = None  # ``weight`` packed for oneDNN, where the base is

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``(W0 + up down) x`` plus ``bias`` ``[N, out]``."""
        return kernels.linear(x, self.weight, self.packed, bias)


class Routing:
    """Routing of ``N`` flattened tokens. ``host``: each token's slot on the CPU (-1 = base
    only; hot tokens are -1 too), from which every host-side decision is taken; ``slots``:
    the same on ``device`` (uploaded when not given). ``index`` maps base-only tokens to the
    permanently empty *null* row ``num_slots`` of every bank, so gathers need no mask.
    ``hot``: which tokens belong to the installed hot merge, on the host (None: none)."""

    def __init__(self, host: torch.Tensor, num_slots: int, gather_budget: int, *,
                 device: torch.device | None = None, slots: torch.Tensor | None = None,
                 hot: torch.Tensor | None = None, all_hot: bool = False) -> None:
        self.device = host.device if device is None else device
        self.host = host  # [N] long, on the CPU
        self.slots = upload(host, self.device) if slots is None else slots  # [N] on device
        self.hot = hot  # [N] bool on the host, or None when no token is hot
        self.all_hot = all_hot  # every token is hot: no correction term at all
        self.num_tokens = int(host.shape[0])
        self.index = torch.where(self.slots < 0, num_slots, self.slots)  # [N] on device
        # From the host copy: the runs of equal slot ids in token order, and from them the
        # distinct slots, how many tokens use each (the banks size their forms with it) and
        # where those tokens lie (``spans``).
        values, lengths = torch.unique_consecutive(host, return_counts=True)  # [R], [R]
        pairs: list[list[int]] = torch.stack([values, lengths]).tolist()
        self.counts: dict[int, int] = {}
        self.spans: dict[int, list[tuple[int, int]]] = {}  # slot -> its runs [start, stop)
        start = 0
        for slot, length in zip(*pairs, strict=True):
            if slot >= 0:
                self.counts[slot] = self.counts.get(slot, 0) + length
                self.spans.setdefault(slot, []).append((start, start + length))
            start += length
        self.unique: list[int] = sorted(self.counts)
        self.unique_set = frozenset(self.unique)
        self.gather_budget = gather_budget
        self.num_slots = num_slots
        # With a hot merge beside other tokens: those tokens (``[C]``) and their own routing,
        # so the banks and the correction run on them alone (the hot tokens need neither).
        self.cold: tuple[torch.Tensor, Routing] | None = None
        self.cold_span: tuple[int, int] | None = None  # the cold tokens, where one run
        if hot is not None and not all_hot:
            cold = torch.nonzero(~hot).flatten()  # [C] host
            self.cold = self._tokens(cold)
            first, last = int(cold[0]), int(cold[-1])
            if last - first + 1 == int(cold.shape[0]):  # the engine packs hot rows first
                self.cold_span = (first, last + 1)
        self._rows: dict[int, torch.Tensor] = {}
        self._ids: dict[tuple[int, ...], torch.Tensor] = {}
        self._subsets: dict[tuple[int, ...], tuple[torch.Tensor, Routing]] = {}
        self._membership: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._segments: dict[tuple[int, ...], Segments] = {}
        self._groups: dict[tuple[int, ...], Groups] = {}

    def _tokens(self, picked: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """Tokens ``picked`` (host ``[M]``) on the device and their own routing."""
        rows = upload(picked, self.device)  # [M]
        return rows, Routing(self.host.index_select(0, picked), self.num_slots,
                             self.gather_budget, device=self.device,
                             slots=self.slots.index_select(0, rows))

    def ids(self, values: list[int]) -> torch.Tensor:
        """``values`` as a long tensor ``[len]`` on the device (cached: the layers of a
        forward share lists of active slots)."""
        key = tuple(values)
        found = self._ids.get(key)
        if found is None:
            found = upload(torch.tensor(values, dtype=torch.long), self.device)
            self._ids[key] = found
        return found

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """Each token's row of ``rows`` ``[S + 1, ...]`` (a bank tensor or a view of one):
        ``[N, ...]``, the null row for base-only tokens. ``index_select``, not advanced
        indexing: on the CPU ``rows[index]`` is ~5x slower (52 vs 10 us for 32 rows of
        2,816)."""
        return rows.index_select(0, self.index)

    def views(self, slot: int) -> list[tuple[int, int]] | None:
        """The runs ``[start, stop)`` of ``slot``'s tokens where segment mode should read
        them as views of the batch: one run, or at most ``MAX_SPANS`` runs of
        ``MIN_RUN`` tokens on average (prefill rows); None where gathering them is cheaper
        (decode rows scattered over the batch: a few ops per run would cost more than one
        ``index_select`` and ``index_copy_``)."""
        spans = self.spans[slot]
        if len(spans) == 1 or (len(spans) <= MAX_SPANS
                               and self.counts[slot] >= MIN_RUN * len(spans)):
            return spans
        return None

    def rows(self, slot: int) -> torch.Tensor:
        """Token positions ``[n_s]`` that use ``slot`` (cached for all layers)."""
        found = self._rows.get(slot)
        if found is None:
            found = upload(torch.nonzero(self.host == slot).flatten(), self.device)
            self._rows[slot] = found
        return found

    def subset(self, slots: list[int]) -> tuple[torch.Tensor, Routing]:
        """The tokens ``[M]`` that use one of ``slots`` and their own routing (cached: the
        banks of a forward share it)."""
        key = tuple(slots)
        found = self._subsets.get(key)
        if found is None:
            ids = torch.tensor(slots, dtype=torch.long)  # [S] host
            found = self._tokens(torch.nonzero(torch.isin(self.host, ids)).flatten())
            self._subsets[key] = found
        return found

    def membership(self, active: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(slots [U], onehot [N, U])`` for a list of active slots; ``onehot[i, u]`` is 1
        where token ``i`` uses ``slots[u]`` (cached: the banks of a batch share lists)."""
        key = tuple(active)
        found = self._membership.get(key)
        if found is None:
            slots = self.ids(active)  # [U]
            found = (slots, (self.slots.unsqueeze(1) == slots.unsqueeze(0)))  # [U], [N, U]
            self._membership[key] = found
        return found

    def segment_length(self, active: list[int]) -> int:
        """``L``: the most tokens any of ``active`` has in this batch (host-side)."""
        return max((self.counts.get(s, 0) for s in active), default=0)

    def _sorted(self, active: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Host side: ``group [N]`` (each token's place in ``active``; ``U`` = none of
        them), ``order [N]`` (tokens of ``active[0]``, then ``active[1]``, ..., in token
        order within a slot, then the others) and the tokens of each active slot."""
        counts = [self.counts.get(s, 0) for s in active]  # tokens of each active slot
        if not all(counts):
            raise ValueError(f"active slots {active} include one no token of the batch uses")
        lut = torch.full((self.num_slots + 1,), len(active), dtype=torch.long)  # slot ->
        lut[torch.tensor(active)] = torch.arange(len(active))  # its place (-1: row S)
        group = lut[self.host]  # [N]
        return group, torch.argsort(group, stable=True), counts  # [N], [N], U

    def groups(self, active: list[int]) -> Groups:
        """:class:`Groups` for a list of active slots (cached). Built on the host, its
        index tensors uploaded."""
        key = tuple(active)
        found = self._groups.get(key)
        if found is None:
            _, order, counts = self._sorted(active)
            starts = [0, *accumulate(counts[:-1])]
            found = Groups(order=upload(order[:sum(counts)], self.device),
                           slots=self.ids(active), starts=self.ids(starts),
                           lengths=self.ids(counts), longest=max(counts))
            self._groups[key] = found
        return found

    def segments(self, active: list[int]) -> Segments:
        """:class:`Segments` for a list of active slots (cached: the banks of a batch share
        lists). Built on the host, its index tensors uploaded."""
        key = tuple(active)
        found = self._segments.get(key)
        if found is not None:
            return found
        group, order, counts = self._sorted(active)
        length = max(counts)  # L
        routed = sum(counts)  # M
        block = self.block(active, length)
        starts = torch.tensor([0, *accumulate(counts[:-1])])  # [U] first sorted position
        tokens = order[:routed]  # [M]
        sorted_group = group[tokens]  # [M]
        rank = torch.arange(routed) - starts[sorted_group]  # [M] place in its group
        rows = sorted_group * length + rank  # [M] padded row of each sorted token
        # padding rows repeat their group's first token; what they compute is dropped
        src = order[starts].repeat_interleave(length)  # [U L]
        src[rows] = tokens
        if routed == self.num_tokens:  # every token routed: address rows in token order
            by_token = torch.empty_like(rows)  # [N]
            by_token[tokens] = rows
            found = Segments(length, upload(src, self.device), upload(by_token, self.device),
                             None, block)
        else:
            found = Segments(length, upload(src, self.device), upload(rows, self.device),
                             upload(tokens, self.device), block)
        self._segments[key] = found
        return found

    def block(self, active: list[int], length: int) -> tuple[int, int] | None:
        """The tokens ``[start, stop)`` the padded layout of ``active`` is, if it is one
        (host-side, from the runs)."""
        first = self.spans[active[0]]
        start = first[0][0] if len(first) == 1 else -1
        stop = start
        for slot in active:
            spans = self.spans[slot]
            if len(spans) != 1 or spans[0] != (stop, stop + length):
                return None
            stop += length
        return start, stop


class SlotPlan:
    """Slot ids for one forward: per token ``[B, T]``/``[N]`` or per row ``[B]``, on the
    host (``host``) and the device (``slot_ids``); ``hot`` (host, same shape, bool) marks
    the rows/tokens of the installed hot merge."""

    def __init__(self, host: torch.Tensor, slot_ids: torch.Tensor, num_slots: int,
                 gather_budget: int, hot: torch.Tensor | None = None,
                 all_hot: bool = False, static: Groups | None = None) -> None:
        self.host = host.reshape(-1)  # [n] long, CPU
        self.slot_ids = slot_ids.reshape(-1)  # [n] long, device
        self.hot = None if hot is None else hot.reshape(-1)  # [n] bool, CPU
        self.all_hot = all_hot
        # A static plan (a step a CUDA graph replays): the tokens grouped over every slot
        # in buffers the caller owns and refills; the layers run one fixed form on it
        # (:meth:`StepMeta.begin_static`)
        self.static = static
        self.num_slots = num_slots
        self.gather_budget = gather_budget
        self._routing: dict[int, Routing] = {}

    def routing(self, num_tokens: int) -> Routing:
        """Routing for a layer input of ``num_tokens`` flattened tokens. Per-row ids are
        repeated over the sequence (``[B] -> [B * T]``)."""
        found = self._routing.get(num_tokens)
        if found is not None:
            return found
        rows = int(self.host.shape[0])
        host, slots, hot = self.host, self.slot_ids, self.hot
        if num_tokens != rows:
            if rows == 0 or num_tokens % rows:
                raise ValueError(f"slot ids for {rows} rows/tokens do not fit a layer input "
                                 f"of {num_tokens} tokens")
            per_row = num_tokens // rows
            host, slots = host.repeat_interleave(per_row), slots.repeat_interleave(per_row)
            hot = None if hot is None else hot.repeat_interleave(per_row)
        found = Routing(host, self.num_slots, self.gather_budget, device=slots.device,
                        slots=slots, hot=hot, all_hot=self.all_hot)
        self._routing[num_tokens] = found
        return found


class StepMeta:
    """The adapter metadata of the forward in flight (None between forwards), shared by
    every layer of one pool. One forward at a time per pool: the engine runs its forwards
    in one thread, and a second :meth:`begin` before :meth:`end` is refused."""

    def __init__(self, num_slots: int, gather_budget: int, device: torch.device,
                 capacity: int = 256) -> None:
        self.num_slots = num_slots
        self.gather_budget = gather_budget
        self._ids = torch.full((capacity,), -1, dtype=torch.long, device=device)  # [cap]
        self.plan: SlotPlan | None = None
        self.hot: dict[str, HotDelta] = {}  # the installed hot merge, by module path

    def begin(self, slot_ids: torch.Tensor, hot: list[bool] | None = None) -> SlotPlan:
        """Route ``slot_ids`` (per row ``[B]`` or per token ``[B, T]``, long, on the host)
        with ``hot`` (per row/token): the ids are copied into the device buffer, the
        routing the layers read is built from the host copy."""
        if self.plan is not None:
            raise PoolError("this pool is already routing a forward (one at a time)")
        if slot_ids.device.type != "cpu":
            raise PoolError("slot ids are routed from the host: give a CPU tensor")
        flat = slot_ids.reshape(-1)  # [n]
        n = int(flat.shape[0])
        if n > self._ids.shape[0]:  # grow by doubling; steady state reuses one buffer
            size = max(n, 2 * int(self._ids.shape[0]))
            self._ids = torch.full((size,), -1, dtype=torch.long, device=self._ids.device)
        ids = self._ids[:n]  # [n] view of the preallocated buffer
        ids.copy_(flat, non_blocking=True)
        hot_flags: torch.Tensor | None = None
        if hot is not None and any(hot) and self.hot:
            if len(hot) != n:
                raise PoolError(f"hot flags for {len(hot)} rows/tokens, slot ids for {n}")
            hot_flags = torch.tensor(hot, dtype=torch.bool)  # [n] host
        plan = SlotPlan(flat, ids, self.num_slots, self.gather_budget, hot_flags,
                        all_hot=hot_flags is not None and all(hot or ()))
        plan.routing(n)  # routed before the forward (per-token ids, or T = 1)
        self.plan = plan
        return plan

    def begin_static(self, host: torch.Tensor, slot_ids: torch.Tensor,
                     groups: Groups) -> SlotPlan:
        """Route a step whose every device input sits in buffers the caller owns and
        refills before each run (a step captured in a CUDA graph and replayed): ``host``
        ``[n]`` the slot ids on the host, ``slot_ids`` ``[n]`` the same in the caller's
        device buffer, ``groups`` the tokens sorted by slot over every slot ``[0, S)``
        (``slots`` = ``arange(S)``, a slot without tokens a group of length 0; grid sized
        by ``longest`` = ``n``). Every token's slot holds low-rank data (and row scales)
        only and no hot merge is installed (the caller checks): each wrapped layer then
        runs its low-rank bank on ``groups`` and its row-scale bank on ``slot_ids``
        whatever the step's slots are (an unoccupied slot's rows are zero, its scales one:
        exactly ``h``), so the layers' work depends on ``n`` alone."""
        if self.plan is not None:
            raise PoolError("this pool is already routing a forward (one at a time)")
        if self.hot:
            raise PoolError("a static step runs without a hot merge")
        plan = SlotPlan(host.reshape(-1), slot_ids, self.num_slots, self.gather_budget,
                        static=groups)
        self.plan = plan
        return plan

    def end(self) -> None:
        self.plan = None
