"""Kernel backends of the engine's decode attention: one signature, one module per backend
(as :mod:`tessera.adapters.ops` is for the banks' ops).

- ``decode(q, keys, values, lengths, scale) -> [B, H, D]``: one new query per row over its
  slab row. Row ``i`` attends to positions ``[0, lengths[i]]`` of ``keys[i]`` and
  ``values[i]`` (its ``lengths[i]`` earlier tokens and the new one, written there before
  attention runs). ``q [B, H, D]``; ``keys``, ``values`` ``[B, H_kv, W, D]`` (views of the
  slab, ``W > max(lengths)``, last dimension contiguous); ``lengths [B]`` long, on the
  device; grouped-query attention: head ``j`` reads KV head ``j // (H / H_kv)``.

:mod:`.torch_ops` is SDPA over the whole width with a mask made from ``lengths``: the
reference (and the probe's). The engine's torch path does better on the CPU by planning
groups of rows by length on the host (:mod:`tessera.engine.attention`). :mod:`.triton_ops`
runs one program per (row, head) over that row's own positions only, reading its length on
the device: no mask, no plan, no host read, and a short row beside a long one reads only
its own length. The engine takes it where the slot pool runs the Triton kernels
(``kernels``: ``auto`` on CUDA) and a start-up probe of this op passes too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from tessera.adapters import ops as adapter_ops
from tessera.adapters.ops import Backend

# decode(q, keys, values, lengths, scale) -> [B, H, D]
DecodeOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float],
                    torch.Tensor]


@functools.cache
def decode(backend: Backend) -> DecodeOp:
    """The ``decode`` op of ``backend``."""
    found: DecodeOp = adapter_ops.op(__name__, "decode", backend)
    return found


def _decode_case(device: torch.device, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of 0 to 150 tokens over a wider slab view, two query heads per KV head."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 4, 16, generator=gen)  # [B, H, D]
    keys = torch.randn(5, 2, 160, 16, generator=gen)  # [B, H_kv, W, D]
    values = torch.randn(5, 2, 160, 16, generator=gen)
    q, keys, values = (t.to(device, dtype) for t in (q, keys, values))
    lengths = torch.tensor([0, 150, 3, 64, 17], device=device)  # [B]
    return (decode("triton")(q, keys, values, lengths, 0.25),
            decode("torch")(q, keys, values, lengths, 0.25))


@functools.cache
def decode_agrees(device_type: str, dtype: torch.dtype) -> bool:
    """Whether the Triton ``decode`` op runs on ``device_type`` in ``dtype`` and equals the
    torch backend's (probed once; a failure is logged, never raised)."""
    return adapter_ops.agrees("decode attention", _decode_case, device_type, dtype)


def resolve(pool: Backend, device: torch.device, dtype: torch.dtype) -> Backend:
    """The decode attention's backend beside a slot pool on ``pool``'s kernels: Triton
    where the pool runs Triton and this op's probe passes, else torch."""
    if pool == "triton" and decode_agrees(device.type, dtype):
        return "triton"
    return "torch"
