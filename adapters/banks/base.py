"""A bank: preallocated packed tensors ``[num_slots + 1, ...]`` for one primitive on one
module. Row ``num_slots`` is the null slot (always cleared) that base-only tokens gather.

Writing a slot copies into that slot's rows only (zero/one padded), evicting refills them:
neither touches another slot nor allocates device memory. :meth:`Bank.write` and
:meth:`Bank.clear` are the only writers of the bank tensors; both end in
:meth:`Bank.slot_changed`, where a bank drops whatever it derived from that slot (the
low-rank bank's stacked factors).

Two execution modes share one bank:
- *segment* (SGMV-like): loop over the distinct slots present, one dense op per slot on
  that slot's tokens. Best for prefill and for few adapters.
- *gather* (BGMV-like): gather per-token parameters and run batched matmuls once. Best for
  decode with many distinct adapters; bounded by ``gather_budget`` elements.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from tessera.adapters.errors import PoolError
from tessera.adapters.method import Limits, SlotData
from tessera.adapters.ops import Backend
from tessera.adapters.plan import Routing
from tessera.adapters.targets import TargetInfo

BankStage = Literal["input", "delta", "scale", "output"]


class Bank(ABC):
    kind: ClassVar[str]
    stage: ClassVar[BankStage]
    fills: ClassVar[dict[str, float]]  # tensor name -> value of an empty slot
    rank_tensor: ClassVar[tuple[str, int] | None] = None  # (name, dim) holding the padded rank

    def __init__(self, num_slots: int, target: TargetInfo, limits: Limits,
                 dtype: torch.dtype, device: torch.device, *,
                 dense_slots: int | None = None, base_layer: nn.Module | None = None,
                 backend: Backend = "torch") -> None:
        """``dense_slots``: how many slots may keep a dense ``[out, in]`` weight derived
        from their rows, for banks that derive one (HUT's, :mod:`.hadamard`); None = all
        (the pool passes ``PoolConfig.dense_slots``). ``base_layer``: the wrapped layer
        (shared, not owned), for banks that multiply by W0 on the kernel it runs
        (:func:`tessera.adapters.kernels.packed_of`); None = plain ``F.linear``.
        ``backend``: the kernels of the banks' batched ops (:mod:`tessera.adapters.ops`)."""
        self.num_slots = num_slots
        self.dtype, self.device = dtype, device
        self.backend = backend
        self.base_layer = base_layer
        self.dense_slots = num_slots if dense_slots is None else min(dense_slots, num_slots)
        self.target = target
        self.t: dict[str, torch.Tensor] = {
            name: torch.full((num_slots + 1, *shape), self.fills[name], dtype=dtype,
                             device=device)
            for name, shape in self.shapes(target, limits).items()
        }
        self.occupied: set[int] = set()
        self.slot_rank = [0] * (num_slots + 1)
        self.slot_meta: list[dict[str, Any]] = [{} for _ in range(num_slots + 1)]
        self.slot_numel = sum(t[0].numel() for t in self.t.values())
        self.setup_derived()

    def setup_derived(self) -> None:
        """Set up state derived from the slots (the end of ``__init__``); none here."""
        return None

    @classmethod
    @abstractmethod
    def shapes(cls, target: TargetInfo, limits: Limits) -> dict[str, tuple[int, ...]]:
        """Per-slot shape of each tensor, padded to the pool's limits."""

    # --- slot management --------------------------------------------------------------
    def write(self, slot: int, data: SlotData) -> None:
        # Check everything before copying anything: a refused write must leave the slot's
        # rows at their fill values (gather mode reads the rows of unoccupied slots too).
        for name, src in data.tensors.items():
            if name not in self.t:
                raise PoolError(f"{self.target.path}: bank {self.kind!r} has no tensor {name!r}")
            dst_shape = self.t[name].shape[1:]
            if src.dim() != len(dst_shape) or any(s > d for s, d in zip(src.shape, dst_shape,
                                                                        strict=True)):
                raise PoolError(
                    f"{self.target.path}.{name}: shape {list(src.shape)} does not fit the "
                    f"pool's {list(dst_shape)} (raise the pool limits)")
        if self.rank_tensor is not None and self.rank_tensor[0] not in data.tensors:
            raise PoolError(f"{self.target.path}: bank {self.kind!r} needs tensor "
                            f"{self.rank_tensor[0]!r}")
        self.clear(slot)
        try:
            for name, src in data.tensors.items():
                self.t[name][slot][tuple(slice(0, n) for n in src.shape)].copy_(src)
            if self.rank_tensor is not None:
                name, dim = self.rank_tensor
                self.slot_rank[slot] = int(data.tensors[name].shape[dim])
            self.slot_meta[slot] = dict(data.meta)
            self.occupied.add(slot)
        finally:
            # again after the copy (clear already did before it): anything derived while
            # the rows were being written is dropped too
            self.slot_changed(slot)

    def clear(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise PoolError(f"slot {slot} out of range [0, {self.num_slots})")
        try:
            for name, tensor in self.t.items():
                tensor[slot].fill_(self.fills[name])
            self.slot_rank[slot] = 0
            self.slot_meta[slot] = {}
            self.occupied.discard(slot)
        finally:
            self.slot_changed(slot)

    def slot_changed(self, slot: int) -> None:
        """Called after every write or clear of ``slot`` (failed ones included): drop any
        state derived from the slot's rows. The base bank derives nothing."""
        return None

    def derived_nbytes(self) -> int:
        """Bytes of state derived from the slots and kept between forwards (stacked
        factors, dense weights); the base bank keeps none."""
        return 0

    def active(self, routing: Routing) -> list[int]:
        return [s for s in routing.unique if s in self.occupied]

    # --- forward --------------------------------------------------------------------------
    def apply(self, h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
              routing: Routing) -> torch.Tensor:
        """Apply this bank's stage. ``h``: the stage's running value ``[N, *]`` (``x`` for
        the input stage, ``y`` otherwise); ``x``: the layer input after the input stage
        ``[N, in]``; ``weight``: W0 ``[out, in]``. Returns the new ``h``."""
        active = self.active(routing)
        if not active:
            return h
        if len(active) == 1 and routing.counts[active[0]] == routing.num_tokens:
            return self.apply_slot(active[0], h, x, weight)  # whole batch on one slot
        gather = (len(active) > 1 and self.can_gather(active)
                  and self.gather_elements(routing, active) <= routing.gather_budget)
        solo = self.solo(routing, active) if gather else active
        if not solo:
            return self.apply_tokens(routing, active, h, x, weight)
        if self.stage == "input":
            h = h.clone()  # h is the caller's activation: never write into it
        for slot in solo:  # segment mode
            self.apply_slot_tokens(routing, slot, h, x, weight)
        rest = [s for s in active if s not in solo]
        if rest:  # gather mode on the other slots' tokens alone
            rows, sub = routing.subset(rest)  # [M], their routing
            h.index_copy_(0, rows, self.apply_tokens(sub, rest, h.index_select(0, rows),
                                                     x.index_select(0, rows), weight))
        return h

    def solo(self, routing: Routing, active: list[int]) -> list[int]:
        """Of the slots a gather-mode forward would batch together, those that run on
        their own tokens instead (segment mode), the others gathered beside them (by
        default none: one gather for all)."""
        return []

    def apply_slot_tokens(self, routing: Routing, slot: int, h: torch.Tensor, x: torch.Tensor,
                          weight: torch.Tensor) -> None:
        """Segment mode for one slot's tokens, in place on ``h`` ``[N, *]``."""
        spans = routing.views(slot)
        if spans is not None:  # few long runs (prefill rows): views, nothing gathered
            for start, stop in spans:
                self.apply_span(slot, h[start:stop], x[start:stop], weight)
            return
        rows = routing.rows(slot)  # [n_s]
        part = self.apply_slot(slot, h.index_select(0, rows), x.index_select(0, rows), weight)
        h.index_copy_(0, rows, part)

    @abstractmethod
    def apply_slot(self, slot: int, h: torch.Tensor, x: torch.Tensor,
                   weight: torch.Tensor) -> torch.Tensor:
        """Segment mode: every token of ``h``/``x`` uses ``slot``."""

    def apply_span(self, slot: int, h: torch.Tensor, x: torch.Tensor,
                   weight: torch.Tensor) -> None:
        """Segment mode on a run of consecutive tokens, in place: ``h`` ``[n, *]`` and
        ``x`` ``[n, in]`` are views of the forward's running value and input."""
        h.copy_(self.apply_slot(slot, h, x, weight))

    @abstractmethod
    def apply_tokens(self, routing: Routing, active: list[int], h: torch.Tensor,
                     x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Gather mode: token ``i`` uses row ``routing.index[i]`` (null row = no-op)."""

    def can_gather(self, active: list[int]) -> bool:
        return True

    def gather_elements(self, routing: Routing, active: list[int]) -> int:
        """Elements gather mode copies for this batch (bounded by ``gather_budget``): by
        default every token's slot parameters."""
        return routing.num_tokens * self.slot_numel

    def max_rank(self, active: list[int]) -> int:
        return max(self.slot_rank[s] for s in active)
