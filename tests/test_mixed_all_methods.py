"""One batch with a row for the base and a row per method (HyperLoader included): each row
equals that adapter run alone (alone through the pool, and through the reference model)."""

from __future__ import annotations

import pytest
import torch

from tessera.adapters import PoolConfig, SlotPool, reference_model, registry
from tessera.adapters.ops import Choice
from tests.factories import FACTORIES
from tests.helpers import assert_close_scaled, logits, pool_logits
from tests.models import input_ids, tiny_model

EXPECTED = {"lora", "dora", "hra", "hut", "soka", "bottleneck", "hyperloader"}


def test_all_issue_methods_are_registered() -> None:
    assert set(registry.all_names()) >= EXPECTED


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("gather_budget", [0, 1 << 40])
@pytest.mark.parametrize("kernels", ["torch", "triton"])  # Triton: its interpreter on a CPU
def test_every_method_in_one_batch(family: str, gather_budget: int, kernels: Choice) -> None:
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(11)
    names = registry.all_names()
    adapters = [FACTORIES[name](model, gen) for name in names]
    ids = input_ids(len(names) + 1, 6, seed=3)
    refs = [logits(reference_model(model, a), ids[i:i + 1]) for i, a in enumerate(adapters)]
    base = logits(model, ids[-1:])

    pool = SlotPool(model, PoolConfig(num_slots=len(names), max_rank=8,
                                      gather_budget=gather_budget, kernels=kernels))
    for slot, adapter in enumerate(adapters):
        pool.load(slot, adapter)
    slots = [*range(len(names)), -1]  # a row per method, then a base row
    mixed = pool_logits(pool, model, ids, slots)
    for row, name in enumerate(names):
        alone = pool_logits(pool, model, ids[row:row + 1], [row])
        assert_close_scaled(mixed[row], alone[0], 1e-5, f"{name}: mixed vs alone")
        assert_close_scaled(mixed[row], refs[row][0], 1e-5, f"{name}: mixed vs reference")
    assert_close_scaled(mixed[-1], base[0], 1e-6, "base row")
