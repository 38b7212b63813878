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
def test_hot_rows_and_other_rows_match_their_references(family: str, hot_method: str) -> None:
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
    # rows: hot, each other adapter, the base, hot again; hot rows hold no slot
    slots = [-1, *range(len(others)), -1, -1]
    flags = [True, *[False] * len(others), False, True]
    ids = input_ids(len(slots), 7)
    with torch.no_grad(), pool.use(torch.tensor(slots), hot=flags):
        mixed = logits(model, ids)
    wants = [hot, *others.values(), None, hot]
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
    pool.install_hot(None)
    with torch.no_grad(), pool.use(torch.tensor([0, 1]), hot=[False, False]):
        cold = logits(model, ids[1:3])
    assert_close_scaled(cold, mixed[1:3], 1e-6, "uninstalled")


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
