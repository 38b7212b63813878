"""Every registered method x every model family: batched mixed == reference == merged."""

from __future__ import annotations

import zlib

import pytest
import torch

from tessera.adapters import PoolConfig, SlotPool, merged_model, reference_model, registry
from tests.factories import FACTORIES
from tests.helpers import assert_close_scaled, logits, pool_logits
from tests.models import FAMILIES, input_ids, tiny_model

FP32_REL = 1e-5


def test_every_registered_method_has_a_factory() -> None:
    assert set(registry.all_names()) <= set(FACTORIES)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", registry.all_names())
@pytest.mark.parametrize("mode", ["segment", "gather"])
def test_mixed_equals_reference_equals_merged(method: str, family: str, mode: str) -> None:
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{method}/{family}".encode()))
    first = FACTORIES[method](model, gen)
    second = FACTORIES[method](model, gen)
    ids = input_ids(5, 7)
    ref_first = logits(reference_model(model, first), ids)
    ref_second = logits(reference_model(model, second), ids)
    merged_first = logits(merged_model(model, first), ids)
    base = logits(model, ids)
    # the adapter really changes the output (non-identity)
    assert (ref_first - base).abs().max() > 1e-3

    budget = 0 if mode == "segment" else 1 << 40
    pool = SlotPool(model, PoolConfig(num_slots=4, max_rank=8, gather_budget=budget))
    pool.load(2, first)
    pool.load(0, second)
    slots = [2, 0, -1, 2, 3]  # slot 3 is empty: base
    mixed = pool_logits(pool, model, ids, slots)
    for row, slot in enumerate(slots):
        want = {2: ref_first, 0: ref_second}.get(slot, base)[row]
        assert_close_scaled(mixed[row], want, FP32_REL, f"row {row} slot {slot}")
    assert_close_scaled(merged_first, ref_first, FP32_REL, "merged vs reference")
