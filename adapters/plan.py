"""Per-forward routing: which slot each token uses, computed once and read by every layer.

The slot index travels beside the Hugging Face forward in a ``ContextVar`` (HF modules do
not pass extra arguments down to their projections). Nothing in the model is mutated per
request: the plan is per call, async- and thread-safe.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

_PLAN: ContextVar[SlotPlan | None] = ContextVar("tessera_slot_plan", default=None)


class Routing:
    """Routing of ``N`` flattened tokens. ``index`` maps base-only tokens (-1) to the
    permanently empty *null* row ``num_slots`` of every bank, so gathers need no mask."""

    def __init__(self, slots: torch.Tensor, num_slots: int, gather_budget: int) -> None:
        self.slots = slots  # [N] long, -1 = base only
        self.num_tokens = int(slots.shape[0])
        self.index = torch.where(slots < 0, torch.full_like(slots, num_slots), slots)  # [N]
        # One host sync per forward (not per layer): the distinct slots of this batch.
        self.unique: list[int] = [s for s in torch.unique(slots).tolist() if s >= 0]
        self.unique_set = frozenset(self.unique)
        self.gather_budget = gather_budget
        self._rows: dict[int, torch.Tensor] = {}
        self._membership: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def rows(self, slot: int) -> torch.Tensor:
        """Token positions ``[n_s]`` that use ``slot`` (cached for all layers)."""
        found = self._rows.get(slot)
        if found is None:
            found = torch.nonzero(self.slots == slot).flatten()
            self._rows[slot] = found
        return found


    def membership(self, active: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(slots [U], onehot [N, U])`` for a list of active slots; ``onehot[i, u]`` is 1
        where token ``i`` uses ``slots[u]`` (cached: the banks of a batch share lists)."""
        key = tuple(active)
        found = self._membership.get(key)
        if found is None:
            slots = torch.tensor(active, dtype=torch.long, device=self.slots.device)
            found = (slots, (self.slots.unsqueeze(1) == slots.unsqueeze(0)))  # [U], [N, U]
            self._membership[key] = found
        return found


class SlotPlan:
    """Slot ids for one forward: per token ``[B, T]``/``[N]`` or per row ``[B]``."""

    def __init__(self, slot_ids: torch.Tensor, num_slots: int, gather_budget: int) -> None:
        self.slot_ids = slot_ids.reshape(-1).long()
        self.num_slots = num_slots
        self.gather_budget = gather_budget
        self._routing: dict[int, Routing] = {}

    def routing(self, num_tokens: int) -> Routing:
        """Routing for a layer input of ``num_tokens`` flattened tokens. Per-row ids are
        repeated over the sequence (``[B] -> [B * T]``)."""
        found = self._routing.get(num_tokens)
        if found is not None:
            return found
        rows = int(self.slot_ids.shape[0])
        if num_tokens == rows:
            slots = self.slot_ids
        elif rows > 0 and num_tokens % rows == 0:
            slots = self.slot_ids.repeat_interleave(num_tokens // rows)
        else:
            raise ValueError(f"slot ids for {rows} rows/tokens do not fit a layer input of "
                             f"{num_tokens} tokens")
        found = Routing(slots, self.num_slots, self.gather_budget)
        self._routing[num_tokens] = found
        return found


def current_plan() -> SlotPlan | None:
    return _PLAN.get()


@contextmanager
def use_plan(plan: SlotPlan) -> Iterator[SlotPlan]:
    token = _PLAN.set(plan)
    try:
        yield plan
    finally:
        _PLAN.reset(token)
