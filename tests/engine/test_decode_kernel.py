"""The decode attention backends of ``tessera.engine.ops`` (Triton: interpreted on a CPU,
fp32; compiled where ``scripts/device-check`` runs on CUDA) against a float64 loop: each
row's query over exactly its own positions, grouped-query heads included."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.adapters import ops as adapter_ops
from tessera.engine import ops
from tessera.engine.ops import torch_ops, triton_ops
from tests.helpers import assert_close_scaled

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: list[int],
              scale: float) -> torch.Tensor:
    """Row by row, head by head, in float64: ``softmax(k q * scale) v`` over the row's
    positions ``[0, length]``. q [B, H, D], keys/values [B, H_kv, W, D] -> [B, H, D]."""
    rows, heads, dim = q.shape
    group = heads // keys.shape[1]
    out = torch.zeros(rows, heads, dim, dtype=torch.float64)
    for i, n in enumerate(lengths):
        for j in range(heads):
            k = keys[i, j // group, :n + 1].double()  # [n + 1, D]
            v = values[i, j // group, :n + 1].double()
            out[i, j] = torch.softmax(k @ q[i, j].double() * scale, dim=0) @ v
    return out


def case(lengths: list[int], heads: int, kv_heads: int, dim: int, spare: int, seed: int
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A query per row and slab views ``[B, H_kv, W, D]`` of a larger slab (more rows, more
    positions than the step reads); what lies past a row's length is large, so a kernel
    reading it would be caught."""
    gen = torch.Generator().manual_seed(seed)
    rows, width = len(lengths), max(lengths) + 1 + spare
    q = torch.randn(rows, heads, dim, generator=gen)  # [B, H, D]
    slab_k = torch.randn(rows + 2, kv_heads, width + 7, dim, generator=gen) * 3  # [R, H, C, D]
    slab_v = torch.randn(rows + 2, kv_heads, width + 7, dim, generator=gen)
    for i, n in enumerate(lengths):  # garbage past each row's length
        slab_k[i, :, n + 1:] = 1e4
        slab_v[i, :, n + 1:] = 1e4
    return (q.to(DEVICE), slab_k[:rows, :, :width].to(DEVICE),
            slab_v[:rows, :, :width].to(DEVICE))


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(0, 200), min_size=1, max_size=6),
       kv_heads=st.integers(1, 3), group=st.integers(1, 3), dim=st.sampled_from([4, 8, 20, 64]),
       spare=st.integers(0, 70), seed=st.integers(0, 1000))
def test_triton_and_torch_decode_equal_the_per_row_loop(
        lengths: list[int], kv_heads: int, group: int, dim: int, spare: int,
        seed: int) -> None:
    """Rows of 1 position up to several blocks of 64 (and ends inside a block), beside
    each other; head dimensions not a power of two; views narrower than the slab."""
    q, keys, values = case(lengths, kv_heads * group, kv_heads, dim, spare, seed)
    scale = 1 / math.sqrt(dim)
    want = reference(q.cpu(), keys.cpu(), values.cpu(), lengths, scale)
    at = torch.tensor(lengths, device=DEVICE)  # [B]
    for name, op in (("triton", triton_ops.decode), ("torch", torch_ops.decode)):
        got = op(q, keys, values, at, scale)
        assert got.shape == want.shape, name
        assert_close_scaled(got.cpu(), want, 1e-5, name)


def test_a_short_row_beside_a_long_one() -> None:
    """31 rows of 9 tokens and one of 1,000 (the engine's long-row case): every row over
    its own length, the query scaled as given."""
    lengths = [9] * 15 + [1000] + [9] * 16
    q, keys, values = case(lengths, 4, 2, 16, 0, 3)
    got = triton_ops.decode(q, keys, values, torch.tensor(lengths, device=DEVICE), 0.3)
    assert_close_scaled(got.cpu(), reference(q.cpu(), keys.cpu(), values.cpu(), lengths, 0.3),
                        1e-5, "triton")


def test_the_backend_follows_the_pool_and_its_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton attention where the pool runs Triton and the op's probe passes; torch
    otherwise (on a CPU the probe runs the interpreter)."""
    assert ops.resolve("torch", DEVICE, torch.float32) == "torch"
    ops.decode_agrees.cache_clear()
    assert ops.resolve("triton", DEVICE, torch.float32) == "triton"
    assert ops.decode("triton") is triton_ops.decode and ops.decode("torch") is torch_ops.decode
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ops.decode_agrees.cache_clear()
    try:  # where Triton cannot run, the probe says no and the engine keeps torch
        assert ops.resolve("triton", torch.device("cpu"), torch.float32) == "torch"
    finally:
        ops.decode_agrees.cache_clear()


def test_a_probe_that_fails_or_disagrees_keeps_torch(caplog: pytest.LogCaptureFixture) -> None:
    def broken(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("no kernel image for this device")

    def wrong(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones(3), torch.zeros(3)

    assert not adapter_ops.agrees("x", broken, DEVICE.type, torch.float32)
    assert not adapter_ops.agrees("y", wrong, DEVICE.type, torch.float32)
    assert [r.getMessage() for r in caplog.records] == [
        "Triton kernels unavailable; torch forms",
        "Triton kernels disagree with torch; torch forms"]
