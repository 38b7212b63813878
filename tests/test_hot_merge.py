"""The hot merge (dLoRA) inside one forward: rows of the hot adapter run on ``W0 + B A`` with
no adapter work, every other row (any method, or the base) gets ``W0 x`` back through the
rank-r correction; each row against the independent reference model of its own adapter."""

from __future__ import annotations

import pytest
import torch

from tessera.adapters import PoolConfig, PoolError, SlotPool, reference_model
from tessera.adapters import targets as tg
from tests.factories import FACTORIES
from tests.helpers import assert_close_scaled, logits
from tests.models import input_ids, tiny_model

OTHERS = ("dora", "hut", "soka", "bottleneck", "hyperloader")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("hot_method", ["lora", "hra"])
@pytest.mark.parametrize("hot_first", [False, True])  # True: the others are one run (views)
def test_hot_rows_and_other_rows_match_their_references(family: str, hot_method: str,
                                                        hot_first: bool) -> None:
    model = tiny_model(family)
    reference_base = tiny_model(family)  # the same seeded weights, never wrapped
    gen = torch.Generator().manual_seed(3)
    hot = FACTORIES[hot_method](model, gen)
    others = {name: FACTORIES[name](model, gen) for name in OTHERS}
    pool = SlotPool(model, PoolConfig(num_slots=len(others), max_rank=8,
                                      max_bottleneck_dim=16))
    for slot, adapter in enumerate(others.values()):
        pool.load(slot, adapter)
    w0 = {path: tg.weight_of(layer.base).clone() for path, layer in pool.layers.items()}
    prepared = pool.prepare(hot)
    assert pool.mergeable_hot(prepared)
    pool.install_hot(pool.hot_merge(prepared))
    # rows: hot, the first other adapter, hot again, each other adapter, the base (or
    # both hot rows first, as the engine packs them); hot rows hold no slot
    slots = [-1, 0, -1, *range(1, len(others)), -1]
    flags = [True, False, True, *[False] * len(others)]
    wants = [hot, others[OTHERS[0]], hot, *list(others.values())[1:], None]
    if hot_first:
        order = [0, 2, 1, *range(3, len(slots))]
        slots, flags, wants = ([v[i] for i in order] for v in (slots, flags, wants))
    ids = input_ids(len(slots), 7)
    with torch.no_grad(), pool.use(torch.tensor(slots), hot=flags) as plan:
        mixed = logits(model, ids)
        cold_span = plan.routing(ids.numel()).cold_span
    assert (cold_span is not None) == hot_first  # the cold rows' 7 tokens each: one run
    for row, adapter in enumerate(wants):
        ref = reference_base if adapter is None else reference_model(reference_base, adapter)
        want = logits(ref, ids[row:row + 1])[0]
        assert_close_scaled(mixed[row], want, 2e-5, f"row {row}")
    for path, layer in pool.layers.items():  # W0 itself never written
        assert torch.equal(tg.weight_of(layer.base), w0[path]), path
    # a forward of hot rows only skips the correction; none: the plain W0 path
    with torch.no_grad(), pool.use(torch.tensor([-1, -1]), hot=[True, True]):
        only_hot = logits(model, ids[:2])
    assert_close_scaled(only_hot[0], mixed[0], 1e-6, "all hot")
    # hot rows and a base row: no bank runs, the correction alone gives the base W0 x
    rows = [i for i, f in enumerate(flags) if f] + [len(slots) - 1]  # hot rows, the base
    with torch.no_grad(), pool.use(torch.tensor([-1, -1, -1]), hot=[True, True, False]):
        hot_and_base = logits(model, ids[rows])
    assert_close_scaled(hot_and_base, mixed[rows], 1e-5, "hot and base rows")
    pool.install_hot(None)
    rows = [slots.index(0), slots.index(1)]  # the rows of slots 0 and 1
    with torch.no_grad(), pool.use(torch.tensor([0, 1]), hot=[False, False]):
        cold = logits(model, ids[rows])
    assert_close_scaled(cold, mixed[rows], 1e-6, "uninstalled")


def test_only_low_rank_adapters_merge_hot_and_only_between_forwards() -> None:
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(4)
    pool = SlotPool(model, PoolConfig(num_slots=2, max_rank=8, max_bottleneck_dim=16))
    for name in ("dora", "hut", "soka", "bottleneck", "hyperloader"):
        prepared = pool.prepare(FACTORIES[name](model, gen))
        assert not pool.mergeable_hot(prepared), name
        with pytest.raises(PoolError):
            pool.hot_merge(prepared)
    merged = pool.hot_merge(pool.prepare(FACTORIES["lora"](model, gen)))
    with torch.no_grad(), pool.use(torch.tensor([-1])), pytest.raises(PoolError):
        pool.install_hot(merged)
