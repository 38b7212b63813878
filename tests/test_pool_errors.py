"""Slot pool errors: bad slots and slot ids, limits, disabled methods, targets selecting
nothing, and failed writes leaving nothing behind."""

from __future__ import annotations

import pytest
import torch

from tessera.adapters import (
    Adapter,
    AdapterValidationError,
    Component,
    PoolConfig,
    PoolError,
    PreparedAdapter,
    SlotData,
    SlotPool,
    UnknownMethodError,
    registry,
)
from tessera.adapters import targets as tg
from tessera.adapters.methods.lora import LoraConfig
from tests.factories import FACTORIES
from tests.helpers import pool_logits
from tests.models import input_ids, tiny_model
from tests.test_pool import (
    ATTENTION,
    assert_only_slot_changed,
    assert_slot_empty,
    lora,
    snapshot,
)

# --- errors -------------------------------------------------------------------------------

def test_slot_out_of_range() -> None:
    model = tiny_model("llama")
    pool = SlotPool(model, PoolConfig(num_slots=3, max_rank=8))
    adapter = FACTORIES["lora"](model, torch.Generator().manual_seed(0))
    for bad in (-1, 3, 100):
        with pytest.raises(PoolError, match=rf"slot {bad} out of range \[0, 3\)"):
            pool.load(bad, adapter)
        with pytest.raises(PoolError, match=rf"slot {bad} out of range"):
            pool.evict(bad)
    assert pool.resident == [None, None, None]


@pytest.mark.parametrize("bad", [[3], [0, -2], [[0, 1], [5, -1]]])
def test_slot_ids_out_of_range(bad: list[int] | list[list[int]]) -> None:
    model = tiny_model("llama")
    pool = SlotPool(model, PoolConfig(num_slots=3, max_rank=8))
    with pytest.raises(PoolError, match=r"slot ids must lie in \[-1, 3\)"), \
            pool.use(torch.tensor(bad)):
        pass


def test_slot_ids_that_fit_no_layer_input() -> None:
    model = tiny_model("llama")
    pool = SlotPool(model, PoolConfig(num_slots=3, max_rank=8))
    pool.load(0, FACTORIES["lora"](model, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="do not fit a layer input"):
        pool_logits(pool, model, input_ids(2, 5), [0, 0, 0])  # 3 ids for 2 rows of 5


@pytest.mark.parametrize("method", registry.all_names())
def test_rank_above_the_pool_limit(method: str) -> None:
    model = tiny_model("llama")
    adapter = FACTORIES[method](model, torch.Generator().manual_seed(0))
    available = tg.discover(model)
    # the largest rank / width per limit, from the configs, and the modules using it
    ranks: dict[str, dict[str, int]] = {}
    for comp in adapter.components:
        m = registry.get(comp.method)
        for path in comp.modules:
            ranks.setdefault(m.rank_limit, {})[path] = m.rank(comp.config, available[path])
    assert any(max(r.values()) > 1 for r in ranks.values()), "factory only draws rank 1"
    for limit, by_path in ranks.items():
        worst = max(by_path.values())
        if worst == 1:
            continue  # no limit below 1 to configure; the other limit is checked
        lowered = {"max_rank": 64, "max_bottleneck_dim": 64, limit: worst - 1}
        pool = SlotPool(tiny_model("llama"), PoolConfig(num_slots=2, **lowered))
        with pytest.raises(AdapterValidationError, match=f"exceeds the limit {worst - 1}") as exc:
            pool.load(0, adapter)
        assert exc.value.tensor is not None
        module = exc.value.tensor.rsplit(".", 1)[0]
        assert by_path.get(module) == worst, exc.value
        assert exc.value.tensor in str(exc.value)
        assert pool.resident == [None, None]
        assert all(not b.occupied for banks in pool.banks().values() for b in banks.values())


@pytest.mark.parametrize("method", registry.all_names())
def test_method_not_enabled_in_the_pool(method: str) -> None:
    model = tiny_model("llama")
    adapter = FACTORIES[method](model, torch.Generator().manual_seed(0))
    others = [m for m in registry.names() if m not in adapter.methods]
    pool = SlotPool(model, PoolConfig(num_slots=2, max_rank=8, methods=others))
    with pytest.raises(PoolError, match=f"method {adapter.methods[0]!r} is not enabled"):
        pool.load(0, adapter)
    assert all(not bank.occupied for banks in pool.banks().values() for bank in banks.values())


@pytest.mark.parametrize("spec", [["nonexistent_proj"], [], "model\\.nothing\\..*"])
def test_pool_target_modules_selecting_nothing(spec: list[str] | str) -> None:
    with pytest.raises(PoolError, match="select no projection"):
        SlotPool(tiny_model("llama"), PoolConfig(num_slots=2, target_modules=spec))


def test_adapter_on_a_module_the_pool_did_not_wrap() -> None:
    model = tiny_model("llama")
    pool = SlotPool(model, PoolConfig(num_slots=2, max_rank=8, target_modules=["q_proj"]))
    assert all(path.endswith("q_proj") for path in pool.layers)
    adapter = lora(model, 2, 0)  # q_proj and v_proj
    with pytest.raises(AdapterValidationError, match=r"v_proj\.lora_A"):
        pool.load(0, adapter)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_failed_write_leaves_the_slot_empty(family: str) -> None:
    """Data prepared by a roomier pool does not fit: the write fails part-way (the first
    modules fit, a later one does not) and must not leave a half-loaded adapter behind."""
    model = tiny_model(family)
    roomy = SlotPool(tiny_model(family), PoolConfig(num_slots=2, max_rank=8))
    config = LoraConfig(r=2, lora_alpha=4.0, target_modules=ATTENTION,
                        rank_pattern={"layers.1.self_attn.v_proj": 5, "h.1.attn.c_attn": 5})
    available = tg.discover(model)
    gen = torch.Generator().manual_seed(0)
    modules = {path: {"lora_A": torch.randn(config.rank_of(path), t.in_features, generator=gen),
                      "lora_B": torch.randn(t.out_features, config.rank_of(path), generator=gen)}
               for path, t in available.items() if path in tg.resolve(ATTENTION, available)}
    prepared = roomy.prepare(Adapter((Component("lora", config, modules),)))
    tight = SlotPool(model, PoolConfig(num_slots=2, max_rank=4))
    tight.load(0, lora(model, 3, 1))
    ids = input_ids(2, 5)
    want = pool_logits(tight, model, ids, [0, -1])
    before = snapshot(tight)
    with pytest.raises(PoolError, match="does not fit the pool's"):
        tight.write(1, prepared)
    assert_only_slot_changed(tight, before, 1)
    assert_slot_empty(tight, 1)
    assert tight.resident[1] is None
    assert torch.equal(pool_logits(tight, model, ids, [0, 1]), want)


def test_a_bank_write_failing_on_its_second_tensor_leaves_fill_values() -> None:
    """Unoccupied rows must hold the fill values (gather mode reads the rows of every slot
    in the batch, occupied or not): a tensor that does not fit is refused before any
    tensor of that write is copied."""
    model = tiny_model("llama")
    pool = SlotPool(model, PoolConfig(num_slots=2, max_rank=4, gather_budget=1 << 40))
    path = "model.layers.0.self_attn.q_proj"
    t = pool.targets[path]
    bad = SlotData({"A": torch.ones(2, t.in_features), "B": torch.ones(t.out_features + 1, 2)})
    adapter = lora(model, 2, 0)
    before = snapshot(pool)
    with pytest.raises(PoolError, match=r"q_proj\.B: shape \[33, 2\] does not fit"):
        pool.write(1, PreparedAdapter(adapter, {(path, "lowrank"): bad}))
    assert_only_slot_changed(pool, before, 1)
    assert_slot_empty(pool, 1)
    pool.load(1, adapter)  # the slot is still usable
    assert 1 in pool.banks()[path]["lowrank"].occupied
    assert pool.resident[1] is adapter


def test_prepared_data_for_modules_the_pool_lacks() -> None:
    model = tiny_model("llama")
    roomy = SlotPool(tiny_model("llama"), PoolConfig(num_slots=2, max_rank=8))
    prepared = roomy.prepare(lora(model, 2, 0))
    narrow = SlotPool(model, PoolConfig(num_slots=2, max_rank=8, target_modules=["q_proj"]))
    with pytest.raises(PoolError, match=r"v_proj"):
        narrow.write(0, prepared)
    assert_slot_empty(narrow, 0)
    assert narrow.resident[0] is None


def test_unknown_method_in_pool_config() -> None:
    with pytest.raises(UnknownMethodError, match="no_such_method"):
        SlotPool(tiny_model("llama"), PoolConfig(num_slots=2, methods=["no_such_method"]))
