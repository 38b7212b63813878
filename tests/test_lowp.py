"""bf16 / fp16 pools on CPU: the fp32 matrix's equalities (mixed == reference == merged),
each side in low precision compared with the fp32 reference of the same adapter.

Tolerance. A low-precision model differs from its fp32 original by rounding alone: weights
rounded once, then every matmul, norm and softmax rounds again. We measure that error on
the *base* model (``e_base``: max |logits_lowp - logits_fp32| / max |logits_fp32|, the same
seeded weights) and require the adapter paths to stay within ``LOWP_FACTOR * e_base`` of
the fp32 reference. The adapter path adds a few roundings of the same kind (the bank
tensors rounded to the model dtype, one or two extra products per projection), so it
should land at a small multiple of ``e_base``; measured over every method and family here
it is 0.7x to 4.4x (bf16 and fp16 alike), hence 8x. A wrong slot, scale or missing term
moves a row by the adapter's own effect, 10 to 100 times more (asserted below, so the
tolerance can never swallow a routing mistake).
"""

from __future__ import annotations

import functools
import zlib

import pytest
import torch

from tessera.adapters import (
    NotMergeableError,
    PoolConfig,
    SlotPool,
    merged_model,
    reference_model,
    registry,
)
from tests.factories import FACTORIES
from tests.helpers import assert_close_scaled, logits, pool_logits
from tests.models import FAMILIES, input_ids, tiny_model

LOWP_FACTOR = 8.0
MODES = {"segment": 0, "gather": 1 << 40}
CASES = [(family, torch.bfloat16) for family in FAMILIES] + [
    (family, torch.float16) for family in ("llama", "gpt2")]
IDS = input_ids(5, 7)
SLOTS = [2, 0, -1, 2, 3]  # slot 3 stays empty: base


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.float()
    return float((actual.float() - expected).abs().max() / expected.abs().max())


@functools.cache
def base_error(family: str, dtype: torch.dtype) -> float:
    """``e_base``: the low-precision base model's relative error against fp32."""
    return rel_err(logits(tiny_model(family, dtype=dtype), IDS), logits(tiny_model(family), IDS))


def row_separation(a: torch.Tensor, b: torch.Tensor) -> float:
    """The smallest per-row relative distance between two logit tensors."""
    return min(rel_err(a[i], b[i]) for i in range(a.shape[0]))


@pytest.mark.parametrize(("family", "dtype"), CASES)
@pytest.mark.parametrize("method", registry.all_names())
def test_lowp_mixed_equals_fp32_reference(method: str, family: str, dtype: torch.dtype) -> None:
    model32 = tiny_model(family)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{method}/{family}".encode()))
    first, second = FACTORIES[method](model32, gen), FACTORIES[method](model32, gen)
    base32 = logits(model32, IDS)
    ref_first = logits(reference_model(model32, first), IDS)
    ref_second = logits(reference_model(model32, second), IDS)
    tol = LOWP_FACTOR * base_error(family, dtype)
    assert 0 < tol < 0.1
    # a routing mistake (base, or the other adapter) must exceed the tolerance by far
    assert row_separation(ref_first, base32) > 2 * tol
    assert row_separation(ref_first, ref_second) > 2 * tol
    assert row_separation(ref_second, base32) > 2 * tol

    # the low-precision single-adapter reference and merged model
    low = tiny_model(family, dtype=dtype)
    low_ref = logits(reference_model(low, first), IDS)
    assert low_ref.dtype == dtype
    assert_close_scaled(low_ref, ref_first, tol, "low-precision reference")
    weight_methods = [m for m in first.methods if registry.get(m).stage == "weight"]
    if all(registry.get(m).mergeable for m in weight_methods):
        merged = logits(merged_model(low, first), IDS)
        assert merged.dtype == dtype
        assert_close_scaled(merged, ref_first, tol, "low-precision merged")
    else:
        with pytest.raises(NotMergeableError):
            merged_model(low, first)

    for mode, budget in MODES.items():
        model = tiny_model(family, dtype=dtype)
        pool = SlotPool(model, PoolConfig(num_slots=4, max_rank=8, gather_budget=budget))
        pool.load(2, first)
        pool.load(0, second)
        mixed = pool_logits(pool, model, IDS, SLOTS)
        assert mixed.dtype == dtype
        for row, slot in enumerate(SLOTS):
            want = {2: ref_first, 0: ref_second}.get(slot, base32)[row]
            assert_close_scaled(mixed[row], want, tol, f"{mode} row {row} slot {slot}")


@pytest.mark.parametrize(("family", "dtype"), CASES)
def test_lowp_base_rows_match_the_lowp_base(family: str, dtype: torch.dtype) -> None:
    """Base rows of a batch with adapters on other rows: the wrapped layers add the bias
    after the GEMM (two roundings; the base fuses them), so a base row is another
    low-precision evaluation of the fp32 base, like the base model itself: each is within
    ~``e_base`` of fp32, so they are within ``2 * e_base`` of each other. A batch with no
    adapter at all takes the base layers themselves: bit-identical."""
    model = tiny_model(family, dtype=dtype)
    base = logits(model, IDS)
    gen = torch.Generator().manual_seed(3)
    pool = SlotPool(model, PoolConfig(num_slots=len(registry.all_names()), max_rank=8))
    for slot, name in enumerate(registry.all_names()):
        pool.load(slot, FACTORIES[name](tiny_model(family), gen))
    mixed = pool_logits(pool, model, IDS, [0, -1, 1, -1, 2])
    for row in (1, 3):
        assert_close_scaled(mixed[row], base[row], 2 * base_error(family, dtype), f"row {row}")
    assert torch.equal(pool_logits(pool, model, IDS, [-1] * 5), base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bank_dtypes_follow_the_model(family: str, dtype: torch.dtype) -> None:
    model = tiny_model(family, dtype=dtype)
    pool = SlotPool(model, PoolConfig(num_slots=2, max_rank=8))
    gen = torch.Generator().manual_seed(0)
    for name in registry.all_names():
        pool.load(0, FACTORIES[name](tiny_model(family), gen))  # fp32 adapter weights
        tensors = [t for banks in pool.banks().values() for bank in banks.values()
                   for t in bank.t.values()]
        assert tensors
        assert {t.dtype for t in tensors} == {dtype}, name
    assert pool.dtype == dtype
