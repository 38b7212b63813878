"""The low-rank bank's batched forms (segment loop, stacked cached and uncached, SGMV-like
segment, per-token gather) against a per-token plain-torch loop, over random slot
assignments and random sequences of slot writes and evictions; the stacked-factor cache's
hits, invalidation and bounds; the form rule."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.overrides import TorchFunctionMode

from tessera.adapters import Adapter, Component, PoolConfig, SlotPool
from tessera.adapters.banks.cache import DerivedCache, Stack
from tessera.adapters.banks.lowrank import LowRankBank, choose_form
from tessera.adapters.method import Limits, SlotData
from tessera.adapters.methods.lora import LoraConfig
from tessera.adapters.plan import MAX_SPANS, MIN_RUN, Routing
from tessera.adapters.targets import TargetInfo

TARGET = TargetInfo("layers.0.q_proj", in_features=12, out_features=10, kind="linear",
                    has_bias=False)
MAX_RANK = 4
Factors = dict[int, tuple[torch.Tensor, torch.Tensor]]  # slot -> (A [r, in], B [out, r])


def new_bank(num_slots: int) -> LowRankBank:
    return LowRankBank(num_slots, TARGET, Limits(max_rank=MAX_RANK), torch.float32,
                       torch.device("cpu"))


def write(bank: LowRankBank, factors: Factors, slot: int, rank: int,
          gen: torch.Generator) -> None:
    a = torch.randn(rank, TARGET.in_features, generator=gen)  # [r, in]
    b = torch.randn(TARGET.out_features, rank, generator=gen)  # [out, r]
    bank.write(slot, SlotData({"A": a, "B": b}))
    factors[slot] = (a, b)


def routing_of(ids: list[int], num_slots: int) -> Routing:
    return Routing(torch.tensor(ids, dtype=torch.long), num_slots, gather_budget=1 << 40)


def plain_loop(factors: Factors, ids: list[int], h: torch.Tensor,
               x: torch.Tensor) -> torch.Tensor:
    """``h_i + B_s (A_s x_i)`` token by token, from the factors as written (not the bank)."""
    expected = h.clone()  # [N, out]
    for i, slot in enumerate(ids):
        if slot in factors:
            a, b = factors[slot]
            expected[i] += b @ (a @ x[i])
    return expected


def every_form(bank: LowRankBank, routing: Routing, h: torch.Tensor,
               x: torch.Tensor) -> dict[str, torch.Tensor]:
    active = bank.active(routing)
    return {
        "stacked": bank.apply_stacked(routing, active, h.clone(), x),
        "stacked again (cache hit)": bank.apply_stacked(routing, active, h.clone(), x),
        "stacked uncached": bank.apply_stacked(routing, active, h.clone(), x, cached=False),
        "segment": bank.apply_segment(routing, active, h.clone(), x),
        "segment uncached": bank.apply_segment(routing, active, h.clone(), x, cached=False),
        "per-token": bank.apply_per_token(routing, active, h.clone(), x),
        "dispatch": bank.apply(h.clone(), x, x, routing),
        "segment mode (views or gathers)": bank.apply(
            h.clone(), x, x, Routing(routing.slots, bank.num_slots, gather_budget=0)),
        "bank reference": bank.reference(routing, h, x),
    }


def check_forms(bank: LowRankBank, factors: Factors, ids: list[int],
                gen: torch.Generator) -> None:
    routing = routing_of(ids, bank.num_slots)
    x = torch.randn(len(ids), TARGET.in_features, generator=gen)  # [N, in]
    h = torch.randn(len(ids), TARGET.out_features, generator=gen)  # [N, out]
    expected = plain_loop(factors, ids, h, x)
    if not bank.active(routing):
        assert torch.equal(bank.apply(h.clone(), x, x, routing), h)
        return
    for name, out in every_form(bank, routing, h, x).items():
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, name=name: f"{name} ids={ids}: {m}")


@settings(max_examples=40, deadline=None)
@given(data=st.data(), num_slots=st.integers(1, 5), num_tokens=st.integers(0, 12),
       seed=st.integers(0, 2**16))
def test_batched_forms_equal_a_per_token_loop(data: st.DataObject, num_slots: int,
                                              num_tokens: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    bank = new_bank(num_slots)
    factors: Factors = {}
    for slot in range(num_slots):
        if data.draw(st.booleans(), label=f"load {slot}"):
            write(bank, factors, slot, data.draw(st.integers(1, MAX_RANK), label="rank"), gen)
    ids = data.draw(st.lists(st.integers(-1, num_slots - 1), min_size=num_tokens,
                             max_size=num_tokens), label="slot ids")
    check_forms(bank, factors, ids, gen)


def runs_of(ids: list[int]) -> dict[int, list[tuple[int, int]]]:
    """Each slot's runs of consecutive tokens ``[start, stop)``, written out token by token."""
    runs: dict[int, list[tuple[int, int]]] = {}
    for i, slot in enumerate(ids):
        if slot < 0:
            continue
        spans = runs.setdefault(slot, [])
        if spans and spans[-1][1] == i:
            spans[-1] = (spans[-1][0], i + 1)
        else:
            spans.append((i, i + 1))
    return runs


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(-1, 4), max_size=30))
def test_routing_finds_each_slots_runs_and_counts(ids: list[int]) -> None:
    routing = routing_of(ids, 5)
    runs = runs_of(ids)
    assert routing.spans == runs
    assert routing.counts == {s: sum(b - a for a, b in r) for s, r in runs.items()}
    assert routing.unique == sorted(runs)


@pytest.mark.parametrize("ids", [
    [0] * 7 + [1] * 5 + [-1] * 3 + [2] * 6,  # prefill rows side by side: one run each
    [0, 1] * 6 + [2] * 3,  # slots 0 and 1 in six runs each: gathered
    [0, -1, 0, 1, 1, 0, -1, 0, 2],  # slot 0 in four short runs (gathered), the rest in one
    [0] * 8 + [1] * 3 + [0] * 9 + [-1, 2],  # slot 0 in two long runs (views)
])
def test_segment_mode_views_and_gathers_equal_the_loop(ids: list[int]) -> None:
    routing = Routing(torch.tensor(ids), 3, gather_budget=0)  # segment mode
    for slot, spans in runs_of(ids).items():  # views: one run, or a few long ones
        long = len(spans) <= MAX_SPANS and sum(b - a for a, b in spans) >= MIN_RUN * len(spans)
        assert routing.views(slot) == (spans if len(spans) == 1 or long else None)
    gen = torch.Generator().manual_seed(len(ids))
    bank = new_bank(3)
    factors: Factors = {}
    for slot, rank in enumerate((4, 2, 3)):
        write(bank, factors, slot, rank, gen)
    x = torch.randn(len(ids), TARGET.in_features, generator=gen)  # [N, in]
    h = torch.randn(len(ids), TARGET.out_features, generator=gen)  # [N, out]
    got = bank.apply(h.clone(), x, x, routing)
    torch.testing.assert_close(got, plain_loop(factors, ids, h, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("ids", "block"), [
    ([0, 0, 1, 1, 2, 2], (0, 6)),  # a decode step's rows shared evenly: the whole batch
    ([0, 1, 2], (0, 3)),  # one row per slot
    ([-1, -1, 0, 0, 0, 2, 2, 2, -1], (2, 8)),  # base rows around the block
    ([0, 0, 1, 1, 1], None),  # uneven: padded
    ([1, 1, 0, 0], None),  # runs not in slot order
    ([0, 0, -1, 1, 1], None),  # a gap
    ([0, 1, 1, 0], None),  # slot 0 in two runs
])
def test_segment_form_reads_an_even_block_as_views(ids: list[int],
                                                  block: tuple[int, int] | None) -> None:
    """Where the padded layout of the segment form is a block of the batch (each active
    slot one run of the same length, in slot order), the form reads and writes views; the
    result equals the loop either way."""
    routing = routing_of(ids, 3)
    gen = torch.Generator().manual_seed(len(ids))
    bank = new_bank(3)
    factors: Factors = {}
    for slot, rank in enumerate((4, 2, 3)):
        write(bank, factors, slot, rank, gen)
    active = bank.active(routing)
    assert routing.segments(active).block == block
    x = torch.randn(len(ids), TARGET.in_features, generator=gen)  # [N, in]
    h = torch.randn(len(ids), TARGET.out_features, generator=gen)  # [N, out]
    got = bank.apply_segment(routing, active, h.clone(), x)
    torch.testing.assert_close(got, plain_loop(factors, ids, h, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("ids", "solo"), [
    ([0] * 24 + [1, 2, 3, 1, 2, 3, -1, 3], [0]),  # one tenant on 24 of 32 decode rows
    ([1, 3] + [0] * 10 + [2] * 9 + [3, 1], [0, 2]),  # two prefill chunks beside strays
    ([0] * 8 + [1] * 8 + [2] * 8 + [3] * 8, []),  # even runs in slot order: one block
    ([0, 1, 2, 3] * 8, []),  # scattered decode rows: one gather-mode form
    ([0] * 7 + [1, 2, 3] * 3, []),  # a run below MIN_RUN
])
def test_a_large_run_runs_alone_beside_the_gathered_others(ids: list[int],
                                                           solo: list[int]) -> None:
    """A skewed batch: slots holding one long run take it as views on their own, the
    others share one gather-mode form (:func:`split_pays`); the result equals the loop."""
    routing = routing_of(ids, 4)
    gen = torch.Generator().manual_seed(len(ids))
    bank = new_bank(4)
    factors: Factors = {}
    for slot, rank in enumerate((4, 2, 3, 1)):
        write(bank, factors, slot, rank, gen)
    assert bank.solo(routing, bank.active(routing)) == solo
    x = torch.randn(len(ids), TARGET.in_features, generator=gen)  # [N, in]
    h = torch.randn(len(ids), TARGET.out_features, generator=gen)  # [N, out]
    got = bank.apply(h.clone(), x, x, routing)
    torch.testing.assert_close(got, plain_loop(factors, ids, h, x), rtol=1e-5, atol=1e-5)


Op = tuple[str, int, int]  # ("write", slot, rank) | ("evict", slot, 0) | ("forward", 0, 0)


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.one_of(
           st.tuples(st.just("write"), st.integers(0, 3), st.integers(1, MAX_RANK)),
           st.tuples(st.just("evict"), st.integers(0, 3), st.just(0)),
           st.tuples(st.just("forward"), st.just(0), st.just(0))), min_size=1, max_size=14),
       ids=st.lists(st.integers(-1, 3), min_size=1, max_size=10), seed=st.integers(0, 2**16))
def test_forms_never_serve_stale_factors(ops: list[Op], ids: list[int], seed: int) -> None:
    """One bank (one cache) through writes, rewrites (other ranks too) and evictions, with
    the same slot ids forwarded between them: every form equals the loop over the factors
    written last, so the cache never serves factors a write replaced."""
    gen = torch.Generator().manual_seed(seed)
    bank = new_bank(4)
    factors: Factors = {}
    write(bank, factors, 0, MAX_RANK, gen)
    write(bank, factors, 1, 1, gen)
    for op, slot, rank in [*ops, ("forward", 0, 0)]:
        if op == "write":
            write(bank, factors, slot, rank, gen)
        elif op == "evict":
            bank.clear(slot)
            factors.pop(slot, None)
        else:
            check_forms(bank, factors, ids, gen)


class BankReads(TorchFunctionMode):
    """Counts torch calls taking one of ``tensors`` as their first argument (indexing,
    index_select, slicing: any read of the bank rows)."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self.ids = {id(t) for t in tensors}
        self.calls: list[str] = []

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        if args and isinstance(args[0], torch.Tensor) and id(args[0]) in self.ids:
            self.calls.append(getattr(func, "__name__", repr(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("form", ["stacked", "segment"])
def test_same_active_set_reads_the_cache_not_the_bank(form: str) -> None:
    gen = torch.Generator().manual_seed(0)
    bank = new_bank(4)
    factors: Factors = {}
    for slot in range(3):
        write(bank, factors, slot, slot + 1, gen)
    ids = [0, 1, 2, 1, 0, -1, 2, 3]  # slot 3 is empty: not active
    apply = bank.apply_stacked if form == "stacked" else bank.apply_segment
    x = torch.randn(len(ids), TARGET.in_features, generator=gen)  # [N, in]
    h = torch.zeros(len(ids), TARGET.out_features)  # [N, out]

    first = apply(routing_of(ids, 4), [0, 1, 2], h, x)
    assert (bank.stacks.hits, bank.stacks.misses) == (0, 1)
    assert list(bank.stacks.entries) == [(0, 1, 2)]
    with BankReads(list(bank.t.values())) as reads:
        again = apply(routing_of(ids, 4), [0, 1, 2], h, x)  # a new step, same active set
    assert reads.calls == []  # no index_select (or any read) of the bank's A / B
    assert (bank.stacks.hits, bank.stacks.misses) == (1, 1)
    assert torch.equal(again, first)

    write(bank, factors, 3, 2, gen)  # a slot outside the set: the entry stays
    assert list(bank.stacks.entries) == [(0, 1, 2)]
    write(bank, factors, 1, MAX_RANK, gen)  # inside the set, at another rank: dropped
    assert not bank.stacks.entries and bank.derived_nbytes() == 0
    after = apply(routing_of(ids, 4), [0, 1, 2], h, x)
    assert bank.stacks.misses == 2
    in_set = {s: f for s, f in factors.items() if s != 3}
    torch.testing.assert_close(after, plain_loop(in_set, ids, h, x), rtol=1e-5, atol=1e-5)
    assert bank.stacks.entries[(0, 1, 2)].a.shape == (3, MAX_RANK, TARGET.in_features)
    stack_bytes = 3 * MAX_RANK * (TARGET.in_features + TARGET.out_features) * 4  # fp32
    assert bank.derived_nbytes() == stack_bytes

    bank.clear(2)  # an eviction drops it too
    assert not bank.stacks.entries


def lora(path: str, gen: torch.Generator, rank: int = 3) -> Adapter:
    config = LoraConfig(r=rank, lora_alpha=float(rank), target_modules=["q_proj"])
    tensors = {"lora_A": torch.randn(rank, 12, generator=gen),  # [r, in]
               "lora_B": torch.randn(10, rank, generator=gen)}  # [out, r]
    return Adapter((Component("lora", config, {path: tensors}),))


def test_pool_write_and_evict_invalidate_the_stacks() -> None:
    """Through the pool (the server's path): a reload or an eviction of a slot in the
    active set is visible on the next forward."""
    holder = nn.Module()
    holder.q_proj = nn.Linear(12, 10, bias=False)
    pool = SlotPool(holder, PoolConfig(num_slots=3, max_rank=4, methods=["lora"],
                                       gather_budget=1 << 40))
    bank = pool.layers["q_proj"].by_kind["lowrank"]
    assert isinstance(bank, LowRankBank)
    gen = torch.Generator().manual_seed(1)
    ids = [0, 1, 1, 0, 2, 2, 0, 1]  # U 3, L 3: the segment form
    x = torch.randn(len(ids), 12, generator=gen)  # [N, in]

    def forward() -> torch.Tensor:
        with torch.no_grad(), pool.use(ids):
            return holder.q_proj(x)  # type: ignore[no-any-return]

    def expected(loaded: dict[int, Adapter]) -> torch.Tensor:
        w = holder.q_proj.base.weight.detach()  # [out, in]
        want = x @ w.t()  # [N, out]
        for i, slot in enumerate(ids):
            if slot in loaded:
                t = loaded[slot].components[0].modules["q_proj"]
                want[i] += t["lora_B"] @ (t["lora_A"] @ x[i])  # alpha / r = 1
        return want

    loaded = {slot: lora("q_proj", gen) for slot in range(3)}
    for slot, adapter in loaded.items():
        pool.load(slot, adapter)
    torch.testing.assert_close(forward(), expected(loaded))
    forward()
    assert bank.stacks.hits >= 1 and list(bank.stacks.entries) == [(0, 1, 2)]
    loaded[1] = lora("q_proj", gen, rank=2)
    pool.load(1, loaded[1])
    assert not bank.stacks.entries
    torch.testing.assert_close(forward(), expected(loaded))
    pool.evict(2)
    del loaded[2]
    assert not bank.stacks.entries
    torch.testing.assert_close(forward(), expected(loaded))


@pytest.mark.parametrize("form", ["stacked", "segment", "per-token"])
def test_an_overflowing_tenant_does_not_reach_other_tokens(form: str) -> None:
    """Slot 1's A overflows to inf on every input; slot 0's and base tokens stay finite
    and exact (the stacked form masks with masked_fill: inf * 0 would be NaN)."""
    gen = torch.Generator().manual_seed(2)
    bank = new_bank(2)
    factors: Factors = {}
    write(bank, factors, 0, 2, gen)
    bank.write(1, SlotData({"A": torch.full((2, TARGET.in_features), 3e38),
                            "B": torch.ones(TARGET.out_features, 2)}))
    ids = [0, 1, -1, 0, 1, 0]
    routing = routing_of(ids, 2)
    x = torch.rand(len(ids), TARGET.in_features, generator=gen) + 1.0  # [N, in] > 0
    h = torch.zeros(len(ids), TARGET.out_features)  # [N, out]
    apply = {"stacked": bank.apply_stacked, "segment": bank.apply_segment,
             "per-token": bank.apply_per_token}[form]
    out = apply(routing, [0, 1], h, x)
    clean = [i for i, s in enumerate(ids) if s != 1]
    torch.testing.assert_close(out[clean], plain_loop(factors, ids, h, x)[clean])
    assert not torch.isfinite(out[[1, 4]]).any()


def test_stack_cache_is_bounded_and_drops_a_stack_built_across_an_invalidation() -> None:
    def stack(u: int) -> Stack:
        return Stack(torch.zeros(u, 1, 2), torch.zeros(u, 1, 3))  # numel 5 u

    cache: DerivedCache[Stack] = DerivedCache(budget=30, entries=2)
    for key in [(0,), (1,), (2,)]:
        cache.get(key, lambda: stack(1))
    assert list(cache.entries) == [(1,), (2,)] and cache.numel == 10  # LRU, 2 entries
    cache.get((1,), lambda: stack(9))  # a hit: refreshes (1,), builds nothing
    assert list(cache.entries) == [(2,), (1,)] and cache.hits == 1
    cache.get((0, 1, 2, 3, 4, 5, 6), lambda: stack(7))  # 35 > budget: returned, not kept
    assert list(cache.entries) == [(2,), (1,)]
    cache.get((3, 4, 5, 6), lambda: stack(4))  # a third entry: the oldest goes
    assert list(cache.entries) == [(1,), (3, 4, 5, 6)] and cache.numel == 25

    def racing() -> Stack:
        cache.invalidate(9)  # a write lands while the stack is being built
        return stack(1)

    cache.get((7,), racing)
    assert (7,) not in cache.entries


def test_the_form_rule_on_the_measured_shapes() -> None:
    """Batch 64 (docstring of tessera.adapters.banks.lowrank): segment for slots sharing the batch
    evenly, stacked for one dominant slot with strays, per-token when both pad badly."""
    assert [choose_form(64, u, 64 // u) for u in (2, 4, 16, 64)] == ["segment"] * 4
    assert choose_form(64, 9, 56) == "stacked"
    assert choose_form(64, 32, 33) == "per-token"
    assert choose_form(256, 16, 16) == "segment"


def test_a_copied_bank_starts_with_an_empty_cache() -> None:
    """deepcopy (tests, merged variants) copies the rows, not the derived stacks."""
    gen = torch.Generator().manual_seed(4)
    bank = new_bank(2)
    factors: Factors = {}
    write(bank, factors, 0, 2, gen)
    write(bank, factors, 1, 3, gen)
    check_forms(bank, factors, [0, 1, 1, 0], gen)
    twin = copy.deepcopy(bank)
    assert bank.stacks.entries and not twin.stacks.entries and twin.stacks.hits == 0
    write(twin, factors, 0, 1, gen)  # the twin's write leaves the original's cache alone
    assert (0, 1) in bank.stacks.entries
    check_forms(twin, factors, [0, 1, 1, 0], gen)
