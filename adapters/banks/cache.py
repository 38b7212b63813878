"""State a bank derives from its slots' rows (the low-rank bank's stacked factors, HUT's
dense weights), kept between forwards and dropped when one of its slots is written.

Keys are tuples of slots. :meth:`DerivedCache.invalidate` (called from a bank's
``slot_changed``, i.e. by its only writers) drops every entry holding a slot; a value
built while an invalidation happened is returned but not kept, so the cache never serves
state older than the last write. At most ``entries`` values holding ``budget`` elements
together are kept: with ``evict`` the least recently used go to make room; without it a
full cache keeps what it has (:meth:`admits` tells a caller beforehand, so that it can
take a path that needs no entry instead of building one per forward).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Generic, Protocol, TypeVar

import torch

from tessera.adapters.banks.base import Bank
from tessera.adapters.plan import upload

STACK_ENTRIES = 4  # active sets of stacked factors kept per bank (decode alternates few)


class Derived(Protocol):
    @property
    def numel(self) -> int:
        """Elements held (what the budget counts)."""


V = TypeVar("V", bound=Derived)
Key = tuple[int, ...]


@dataclass(frozen=True)
class Stack:
    """Two-factor weights of ``U`` active slots in the layouts the GEMMs read (no
    transposed copy per step): ``a`` viewed ``[U r, in]`` is the first factor stacked,
    ``bt`` viewed ``[U r, out]`` the second's transpose (LoRA's A and B^T, a bottleneck's
    down and up^T)."""

    a: torch.Tensor  # [U, r, in]
    bt: torch.Tensor  # [U, r, out]

    @property
    def numel(self) -> int:
        return self.a.numel() + self.bt.numel()


class DerivedCache(Generic[V]):
    def __init__(self, budget: int, entries: int, evict: bool = True) -> None:
        self.budget = budget
        self.max_entries = entries
        self.evict = evict
        self.entries: OrderedDict[Key, V] = OrderedDict()
        self.numel = 0
        self.hits = 0
        self.misses = 0
        self._generation = 0  # bumped by every invalidation
        self._lock = threading.Lock()

    def admits(self, key: Key) -> bool:
        """Whether ``key`` is cached or would be kept without evicting anything."""
        with self._lock:
            return key in self.entries or len(self.entries) < self.max_entries

    def get(self, key: Key, build: Callable[[], V]) -> V:
        with self._lock:
            found = self.entries.get(key)
            if found is not None:
                self.entries.move_to_end(key)
                self.hits += 1
                return found
            self.misses += 1
            generation = self._generation
        value = build()
        with self._lock:
            if generation == self._generation and key not in self.entries \
                    and value.numel <= self.budget and self._room(value.numel):
                self.entries[key] = value
                self.numel += value.numel
        return value

    def _room(self, numel: int) -> bool:
        """Make room for one more value of ``numel`` elements (evicting the least recently
        used, where allowed); whether there is room. Caller holds the lock."""
        while self.entries and (self.numel + numel > self.budget
                                or len(self.entries) >= self.max_entries):
            if not self.evict:
                return False
            _, old = self.entries.popitem(last=False)
            self.numel -= old.numel
        return len(self.entries) < self.max_entries

    def invalidate(self, slot: int) -> None:
        with self._lock:
            self._generation += 1
            for key in [key for key in self.entries if slot in key]:
                self.numel -= self.entries.pop(key).numel

    def __getstate__(self) -> dict[str, object]:
        """A copied (deepcopy, pickle) cache starts empty: its entries were built from the
        original bank's tensors, and a lock cannot be copied."""
        return {"budget": self.budget, "max_entries": self.max_entries, "evict": self.evict}

    def __setstate__(self, state: dict[str, object]) -> None:
        budget, entries, evict = state["budget"], state["max_entries"], state["evict"]
        assert isinstance(budget, int) and isinstance(entries, int) and isinstance(evict, bool)
        self.__init__(budget, entries, evict)  # type: ignore[misc]


class StackedBank(Bank):
    """A bank whose gather mode reads two factors of the active slots stacked (the
    low-rank bank's ``A`` and ``B``, the bottleneck's ``D`` and ``U``): ``factors`` names
    them, first ``[S+1, r_max, d1]``, second ``[S+1, d2, r_max]``. The stacks are kept per
    set of active slots, at most the bank's own size (worst case its memory doubles)."""

    factors_names: ClassVar[tuple[str, str]]

    def setup_derived(self) -> None:
        first, second = (self.t[name] for name in self.factors_names)
        self.stacks: DerivedCache[Stack] = DerivedCache(
            budget=first.numel() + second.numel(), entries=STACK_ENTRIES)

    def slot_changed(self, slot: int) -> None:
        self.stacks.invalidate(slot)

    def derived_nbytes(self) -> int:
        return self.stacks.numel * self.t[self.factors_names[0]].element_size()

    def build_stack(self, active: list[int]) -> Stack:
        """Uncached: the active slots' factors at their largest rank (a cache miss)."""
        first, second = (self.t[name] for name in self.factors_names)
        r = self.max_rank(active)
        slots = upload(torch.tensor(active, dtype=torch.long), first.device)  # [U]
        a = first[:, :r].index_select(0, slots)  # [U, r, d1]
        b = second[:, :, :r].index_select(0, slots)  # [U, d2, r]
        return Stack(a, b.transpose(1, 2).contiguous())  # [U, r, d1], [U, r, d2]

    def stack(self, active: list[int], cached: bool = True) -> Stack:
        if not cached:
            return self.build_stack(active)
        return self.stacks.get(tuple(active), lambda: self.build_stack(active))
