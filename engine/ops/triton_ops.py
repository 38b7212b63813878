"""Triton backend of :mod:`tessera.engine.ops`: decode attention over the slab, each row
over its own length (read on the device).

Program ``(i, j)`` takes row ``i``'s query of head ``j`` ``[D]`` and walks KV head
``j // group``'s positions ``[0, lengths[i]]`` in blocks of ``BLOCK_N``: scores
``k q * scale`` ``[BLOCK_N]``, then the online softmax (running maximum and sum, the
accumulator ``[D]`` rescaled as the maximum grows), all in fp32; positions past the row's
length are neither read nor counted. Matrix-vector work, so no ``tl.dot`` (whose tiles are
at least 16 wide) and no tensor cores: decode attention is bound by reading the keys and
values. One program per (row, head) keeps a long row on one program (no split over its
length): fine for batches of rows, a known limit for one very long row alone.

Tested against :mod:`.torch_ops` and a float64 loop in Triton's interpreter on the CPU
(``tests/engine/test_decode_kernel.py``); on CUDA by ``scripts/device-check`` where a GPU
is lent. ``BLOCK_N`` is fixed, not tuned (no GPU was lent to tune it).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # key positions per step


@triton.jit  # type: ignore[untyped-decorator]
def _decode(q_ptr: Any, k_ptr: Any, v_ptr: Any, lengths_ptr: Any, out_ptr: Any, scale: Any,
            head_dim: Any, stride_qb: Any, stride_qh: Any, stride_kb: Any, stride_kh: Any,
            stride_kn: Any, stride_vb: Any, stride_vh: Any, stride_vn: Any, stride_ob: Any,
            stride_oh: Any, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_D: tl.constexpr) -> None:
    i = tl.program_id(0)
    j = tl.program_id(1)
    kv = j // GROUP
    n = tl.load(lengths_ptr + i) + 1  # positions attended: its tokens and the new one
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < head_dim
    q = tl.load(q_ptr + i * stride_qb + j * stride_qh + offs_d, mask=in_d,
                other=0.0).to(tl.float32)  # [BD]
    top = tl.max(tl.full((BLOCK_N,), float("-inf"), tl.float32), axis=0)  # running max
    total = tl.sum(tl.zeros((BLOCK_N,), tl.float32), axis=0)  # running sum of exp
    acc = tl.zeros((BLOCK_D,), tl.float32)  # [BD] running sum of exp * v
    k_row = k_ptr + i * stride_kb + kv * stride_kh
    v_row = v_ptr + i * stride_vb + kv * stride_vh
    for start in range(0, n, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        in_n = offs_n < n
        both = in_n[:, None] & in_d[None, :]
        k = tl.load(k_row + offs_n[:, None] * stride_kn + offs_d[None, :], mask=both,
                    other=0.0).to(tl.float32)  # [BN, BD]
        s = tl.sum(k * q[None, :], axis=1) * scale  # [BN]
        s = tl.where(in_n, s, float("-inf"))
        new_top = tl.maximum(top, tl.max(s, axis=0))
        p = tl.exp(s - new_top)  # [BN]: 0 past the row's length
        rescale = tl.exp(top - new_top)  # 0 on the first block (top = -inf)
        v = tl.load(v_row + offs_n[:, None] * stride_vn + offs_d[None, :], mask=both,
                    other=0.0).to(tl.float32)  # [BN, BD]
        total = total * rescale + tl.sum(p, axis=0)
        acc = acc * rescale + tl.sum(p[:, None] * v, axis=0)
        top = new_top
    tl.store(out_ptr + i * stride_ob + j * stride_oh + offs_d,
             (acc / total).to(out_ptr.dtype.element_ty), mask=in_d)


def decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
           scale: float) -> torch.Tensor:
    """Row ``i`` over positions ``[0, lengths[i]]`` of its keys and values. ``q [B, H, D]``,
    ``keys``/``values`` ``[B, H_kv, W, D]`` (last dimension contiguous), ``lengths [B]``
    -> ``[B, H, D]``."""
    rows, heads, dim = q.shape
    out = torch.empty((rows, heads, dim), dtype=q.dtype, device=q.device)  # [B, H, D]
    if rows == 0:
        return out
    if q.stride(2) != 1 or keys.stride(3) != 1 or values.stride(3) != 1:
        raise ValueError("decode attention needs the head dimension contiguous")
    _decode[(rows, heads)](
        q, keys, values, lengths, out, scale, dim, q.stride(0), q.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1),
        values.stride(2), out.stride(0), out.stride(1), GROUP=heads // keys.shape[1],
        BLOCK_N=BLOCK_N, BLOCK_D=triton.next_power_of_2(dim))
    return out
