"""Slot pool contract: slot isolation, no allocation, empty == base, routing shapes,
per-token mixes, full replacement on reload, and the memory footprint (errors are in
test_pool_errors.py)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tessera.adapters import (
    Adapter,
    Component,
    PoolConfig,
    SlotPool,
    reference_model,
    registry,
)
from tessera.adapters import targets as tg
from tessera.adapters.banks import BANKS
from tessera.adapters.methods.lora import LoraConfig
from tests.factories import FACTORIES
from tests.helpers import assert_close_scaled, logits, pool_logits
from tests.models import input_ids, tiny_model
from tests.test_properties import LINEAR_PATHS, make_holder

FP32_REL = 1e-5
MODES = {"segment": 0, "gather": 1 << 40}
ATTENTION = ["q_proj", "v_proj", "c_attn"]

Snapshot = dict[tuple[str, str, str], tuple[torch.Tensor, int, torch.Tensor]]


def all_adapters(model: nn.Module, seed: int) -> dict[str, Adapter]:
    gen = torch.Generator().manual_seed(seed)
    return {name: FACTORIES[name](model, gen) for name in registry.all_names()}


def full_pool(model: nn.Module, num_slots: int, budget: int = 1 << 22) -> SlotPool:
    return SlotPool(model, PoolConfig(num_slots=num_slots, max_rank=8, gather_budget=budget))


def snapshot(pool: SlotPool) -> Snapshot:
    """Every bank tensor: (the object, its data pointer, a copy of its values)."""
    return {(path, kind, name): (t, t.data_ptr(), t.clone())
            for path, banks in pool.banks().items() for kind, bank in banks.items()
            for name, t in bank.t.items()}


def assert_only_slot_changed(pool: SlotPool, before: Snapshot, slot: int) -> None:
    """No bank tensor was reallocated, every row but ``slot`` is bit-identical, and the
    null row still holds the bank's fill values."""
    after = snapshot(pool)
    assert after.keys() == before.keys()
    others = [s for s in range(pool.num_slots + 1) if s != slot]
    for key, (tensor, ptr, values) in before.items():
        now, now_ptr, now_values = after[key]
        assert now is tensor, f"{key}: bank tensor replaced"
        assert now_ptr == ptr, f"{key}: bank tensor reallocated"
        assert torch.equal(now_values[others], values[others]), f"{key}: other slot changed"
        fill = BANKS[key[1]].fills[key[2]]
        null = now_values[pool.num_slots]
        assert torch.equal(null, torch.full_like(null, fill)), f"{key}: null row changed"


def assert_slot_empty(pool: SlotPool, slot: int) -> None:
    for path, banks in pool.banks().items():
        for kind, bank in banks.items():
            assert slot not in bank.occupied, f"{path} {kind}: slot {slot} still occupied"
            for name, t in bank.t.items():
                row = t[slot]
                assert torch.equal(row, torch.full_like(row, bank.fills[name])), \
                    f"{path} {kind}.{name}: slot {slot} not cleared"


def lora(model: nn.Module, r: int, seed: int, alpha: float = 4.0) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=ATTENTION)
    available = tg.discover(model)
    modules = {path: {"lora_A": torch.randn(r, available[path].in_features, generator=gen),
                      "lora_B": torch.randn(available[path].out_features, r, generator=gen)}
               for path in tg.resolve(ATTENTION, available)}
    return Adapter((Component("lora", config, modules),))


# --- isolation and allocation -------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_load_and_evict_touch_only_their_slot(family: str) -> None:
    model = tiny_model(family)
    names = registry.all_names()
    first, second = all_adapters(model, 1), all_adapters(model, 2)
    pool = full_pool(model, num_slots=len(names) + 1)
    for slot, name in enumerate(names):
        pool.load(slot, first[name])
    for slot, name in enumerate(names):
        # replace with another method's adapter, so other kinds of bank are left behind
        before = snapshot(pool)
        pool.load(slot, second[names[(slot + 1) % len(names)]])
        assert_only_slot_changed(pool, before, slot)
        before = snapshot(pool)
        pool.evict(slot)
        assert_only_slot_changed(pool, before, slot)
        assert_slot_empty(pool, slot)
        assert pool.resident[slot] is None
        before = snapshot(pool)
        pool.load(slot, first[name])
        assert_only_slot_changed(pool, before, slot)
    before = snapshot(pool)
    pool.evict(len(names))  # evicting an empty slot changes nothing at all
    assert_only_slot_changed(pool, before, -1)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_forward_allocates_no_bank_and_changes_no_slot(family: str) -> None:
    model = tiny_model(family)
    adapters = all_adapters(model, 3)
    pool = full_pool(model, num_slots=len(adapters), budget=1 << 40)
    for slot, adapter in enumerate(adapters.values()):
        pool.load(slot, adapter)
    before = snapshot(pool)
    pool_logits(pool, model, input_ids(len(adapters) + 1, 4), [*range(len(adapters)), -1])
    assert_only_slot_changed(pool, before, -1)


# --- empty slots are the base ---------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_evicted_and_empty_slots_equal_the_base(family: str, mode: str) -> None:
    model = tiny_model(family)
    ids = input_ids(3, 5)
    base = logits(model, ids)
    adapters = all_adapters(model, 4)
    pool = full_pool(model, num_slots=len(adapters) + 1, budget=MODES[mode])
    for slot, adapter in enumerate(adapters.values()):
        pool.load(slot, adapter)
    empty = len(adapters)
    for slot, name in enumerate(adapters):
        loaded = pool_logits(pool, model, ids, [slot] * 3)
        assert (loaded - base).abs().max() > 1e-3, f"{name} does not change the output"
        pool.evict(slot)
        # nothing in the batch is occupied: every wrapped layer is exactly the base layer
        assert torch.equal(pool_logits(pool, model, ids, [slot] * 3), base), name
        assert torch.equal(pool_logits(pool, model, ids, [empty, slot, -1]), base), name
    # an evicted slot beside a loaded one (the loaded row takes the adapter path)
    pool.load(0, adapters[registry.all_names()[0]])
    mixed = pool_logits(pool, model, ids, [1, 0, empty])
    for row in (0, 2):
        assert_close_scaled(mixed[row], base[row], 1e-6, f"row {row}")


# --- routing shapes -----------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_per_row_and_per_token_ids_agree(family: str, mode: str) -> None:
    model = tiny_model(family)
    adapters = list(all_adapters(model, 5).values())
    pool = full_pool(model, num_slots=len(adapters) + 1, budget=MODES[mode])
    for slot, adapter in enumerate(adapters):
        pool.load(slot, adapter)
    rows = [len(adapters), *range(len(adapters)), -1, 0]
    ids = input_ids(len(rows), 6)
    per_row = pool_logits(pool, model, ids, rows)
    with torch.no_grad(), pool.use(torch.tensor(rows).unsqueeze(1).expand(-1, 6)):
        per_token = model(input_ids=ids).logits
    assert torch.equal(per_row, per_token)
    with torch.no_grad(), pool.use(torch.tensor(rows).repeat_interleave(6)):  # flat [B * T]
        flat = model(input_ids=ids).logits
    assert torch.equal(per_row, flat)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_per_token_mix_inside_one_row(kind: str, mode: str) -> None:
    """One wrapped projection, ``[B, T]`` slot ids mixing slots inside each row, against
    ``W0 x + b + s B A x`` per token in plain torch."""
    path = LINEAR_PATHS[0] if kind == "linear" else "transformer.h.0.attn.c_attn"
    in_f, out_f = 7, 5
    holder = make_holder(kind, path, in_f, out_f, True, 0)
    gen = torch.Generator().manual_seed(1)
    specs = {0: (3, 6.0), 1: (1, 2.0), 2: (4, 1.0)}  # slot -> (rank, alpha)
    tensors = {slot: (torch.randn(r, in_f, generator=gen), torch.randn(out_f, r, generator=gen))
               for slot, (r, _) in specs.items()}
    base = tg.unwrap(holder.get_submodule(path))
    w, b = tg.weight_of(base).detach().clone(), tg.bias_of(base)
    assert b is not None
    b = b.detach().clone()
    pool = SlotPool(holder, PoolConfig(num_slots=4, max_rank=4, gather_budget=MODES[mode]))
    name = path.rsplit(".", 1)[-1]
    for slot, (r, alpha) in specs.items():
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=[name])
        a_mat, b_mat = tensors[slot]
        pool.load(slot, Adapter((Component("lora", config,
                                           {path: {"lora_A": a_mat, "lora_B": b_mat}}),)))
    slot_ids = torch.tensor([[0, 1, -1, 2, 0], [3, 2, 2, 1, -1]])  # slot 3 is empty
    x = torch.randn(2, 5, in_f, generator=gen)
    with torch.no_grad(), pool.use(slot_ids):
        got = holder(x)
    want = torch.empty(2, 5, out_f)
    for i in range(2):
        for j in range(5):
            y = w @ x[i, j] + b
            slot = int(slot_ids[i, j])
            if slot in specs:
                r, alpha = specs[slot]
                a_mat, b_mat = tensors[slot]
                y = y + alpha / r * (b_mat @ (a_mat @ x[i, j]))
            want[i, j] = y
    assert_close_scaled(got, want, FP32_REL, mode)


# --- reload replaces fully ------------------------------------------------------------------

def bank_state(pool: SlotPool, slot: int) -> dict[tuple[str, str, str], torch.Tensor]:
    return {(path, kind, name): t[slot].clone() for path, banks in pool.banks().items()
            for kind, bank in banks.items() for name, t in bank.t.items()}


def assert_same_slot(pool: SlotPool, fresh: SlotPool, slot: int) -> None:
    got, want = bank_state(pool, slot), bank_state(fresh, slot)
    for key in want:
        assert torch.equal(got[key], want[key]), f"{key}: residue in slot {slot}"
    for path, banks in pool.banks().items():
        for kind, bank in banks.items():
            other = fresh.banks()[path][kind]
            assert (slot in bank.occupied) == (slot in other.occupied), (path, kind)
            assert bank.slot_rank[slot] == other.slot_rank[slot], (path, kind)
            assert bank.slot_meta[slot] == other.slot_meta[slot], (path, kind)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_reload_lower_rank_leaves_no_residue(family: str, mode: str) -> None:
    model = tiny_model(family)
    big, small, other = lora(model, 8, 1), lora(model, 2, 2), lora(model, 3, 3)
    pool = SlotPool(model, PoolConfig(num_slots=3, max_rank=8, gather_budget=MODES[mode]))
    pool.load(2, other)
    pool.load(1, big)
    pool.load(1, small)
    fresh_model = tiny_model(family)
    fresh = SlotPool(fresh_model, PoolConfig(num_slots=3, max_rank=8,
                                             gather_budget=MODES[mode]))
    fresh.load(2, other)
    fresh.load(1, small)
    assert_same_slot(pool, fresh, 1)
    ids = input_ids(4, 5)
    got = pool_logits(pool, model, ids, [1, 2, -1, 1])
    want = pool_logits(fresh, fresh_model, ids, [1, 2, -1, 1])
    assert torch.equal(got, want)
    ref = logits(reference_model(model, small), ids)
    for row in (0, 3):
        assert_close_scaled(got[row], ref[row], FP32_REL, f"row {row}")


@pytest.mark.parametrize("first", registry.all_names())
def test_reload_with_any_other_adapter_replaces_fully(first: str) -> None:
    model, fresh_model = tiny_model("gpt2"), tiny_model("gpt2")
    gen = torch.Generator().manual_seed(6)
    old = FACTORIES[first](model, gen)
    for second in registry.all_names():
        new = FACTORIES[second](model, gen)
        pool = full_pool(model, num_slots=2)
        pool.load(0, old)
        pool.load(0, new)
        fresh = full_pool(fresh_model, num_slots=2)
        fresh.load(0, new)
        assert_same_slot(pool, fresh, 0)
        assert pool.resident[0] is new
        ids = input_ids(2, 4)
        assert torch.equal(pool_logits(pool, model, ids, [0, 0]),
                           pool_logits(fresh, fresh_model, ids, [0, 0])), (first, second)
        model, fresh_model = tiny_model("gpt2"), tiny_model("gpt2")


# --- memory footprint -----------------------------------------------------------------------

def projections(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``(in, out)`` of each decoder projection, read from the weights in plain torch."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head:
            found[path] = (module.weight.shape[1], module.weight.shape[0])
        elif isinstance(module, Conv1D):
            found[path] = (module.weight.shape[0], module.weight.shape[1])
    return found


def square_split(n: int) -> tuple[int, int]:
    """``(a, b)``, ``a * b = n``, ``a <= b``, ``a`` as large as possible."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def kron_numel(r: int, i: int, o: int) -> int:
    (m, p), (n, q) = square_split(o), square_split(i)
    return r * (m * n + p * q)  # A [r, m, n], B [r, p, q]


# Per-slot element counts of the bank kinds known when this test was written, from the
# design (rank r, bottleneck width k, projection in/out).
KNOWN_BANK_NUMEL: dict[str, Callable[[int, int, int, int], int]] = {
    "lowrank": lambda r, k, i, o: r * i + o * r,  # A [r, in], B [out, r]
    "rowscale": lambda r, k, i, o: o,  # g [out]
    "affine": lambda r, k, i, o: 2 * i,  # gamma, beta [in]
    "hadamard": lambda r, k, i, o: r * o + r * i,  # a [r, out], c [r, in]
    "kron": lambda r, k, i, o: kron_numel(r, i, o),
    # down [k, out], down_bias [k], up [out, k], up_bias, ln_weight, ln_bias [out]
    "bottleneck": lambda r, k, i, o: 2 * k * o + k + 3 * o,
}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nbytes_of_a_lora_pool(family: str, dtype: torch.dtype) -> None:
    model = tiny_model(family, dtype=dtype)
    slots, r = 5, 6
    expected = sum((slots + 1) * (r * i + o * r) for i, o in projections(model).values())
    pool = SlotPool(model, PoolConfig(num_slots=slots, max_rank=r, methods=["lora"]))
    assert pool.nbytes == expected * (2 if dtype == torch.bfloat16 else 4)


def test_nbytes_of_a_pool_restricted_to_some_modules() -> None:
    model = tiny_model("llama")
    slots, r = 3, 4
    chosen = [(i, o) for path, (i, o) in projections(model).items()
              if path.endswith(("q_proj", "down_proj"))]
    assert len(chosen) == 4  # two layers
    # lowrank (LoRA, DoRA) + DoRA's rowscale g [out]
    expected = sum((slots + 1) * (r * i + o * r + o) for i, o in chosen)
    pool = SlotPool(model, PoolConfig(num_slots=slots, max_rank=r, methods=["lora", "dora"],
                                      target_modules=["q_proj", "down_proj"]))
    assert pool.nbytes == expected * 4


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_nbytes_of_a_pool_with_every_method(family: str) -> None:
    model = tiny_model(family)
    slots, r, k = 3, 5, 7
    kinds = sorted({kind for m in registry.names() for kind in registry.get(m).banks})
    pool = SlotPool(model, PoolConfig(num_slots=slots, max_rank=r, max_bottleneck_dim=k))
    expected = 0
    for path, (i, o) in projections(tiny_model(family)).items():
        banks = pool.banks()[path]
        assert sorted(banks) == kinds
        for kind in kinds:
            if kind in KNOWN_BANK_NUMEL:
                per_slot = KNOWN_BANK_NUMEL[kind](r, k, i, o)
            else:  # a bank added later: its declared per-slot shapes
                per_slot = sum(math.prod(s) for s in BANKS[kind].shapes(
                    banks[kind].target, pool.limits).values())
            expected += (slots + 1) * per_slot
            assert sum(t.numel() for t in banks[kind].t.values()) == (slots + 1) * per_slot
    assert pool.nbytes == expected * 4
