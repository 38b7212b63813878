"""Triton backend of :mod:`tessera.adapters.ops`: SGMV-like LoRA over tokens sorted by
slot (:class:`~tessera.adapters.plan.Groups`), each slot's factors read in place from the
bank's tensors by slot id (no gather of factors, no stacked copy, no host read):

- *shrink*: program ``(g, m)`` takes ``BLOCK_M`` tokens of group ``g`` and computes
  ``low = x A_s^T`` ``[BLOCK_M, BLOCK_R]`` (fp32 accumulation) over ``in`` in steps of
  ``BLOCK_K``, into a ``[M, BLOCK_R]`` fp32 buffer in sorted order;
- *expand*: program ``(g, m, n)`` adds ``low B_s^T`` to a ``BLOCK_N`` wide tile of those
  tokens' rows of ``h`` (a token lies in one group: no two programs write one element).

``tl.dot`` needs tiles of at least 16, so ranks are padded to ``BLOCK_R`` (a power of two
>= 16) by masked loads (the bank's rows past a slot's rank are zero anyway); fp32 inputs
run at IEEE precision (no TF32), so fp32 results equal the torch forms' up to summation
order; bf16/fp16 factors meet ``low`` cast to their dtype (as the torch forms' ``x A^T``
is). The grid covers the longest group; programs past a shorter group's end do nothing.

Tested against :mod:`.torch_ops` in Triton's interpreter on the CPU (fp32;
``tests/test_triton_ops.py``); on CUDA by ``scripts/device-check`` where a GPU is lent.
Block sizes are fixed, not tuned (no GPU was lent to tune them).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from tessera.adapters.plan import Groups

BLOCK_M = 16  # tokens per program (tl.dot's least)
BLOCK_K = 32  # input features per shrink step
BLOCK_N = 64  # output features per expand program


@triton.jit  # type: ignore[untyped-decorator]
def _tile(order_ptr: Any, slots_ptr: Any, starts_ptr: Any, g: Any, m0: Any, length: Any,
          BLOCK_M: tl.constexpr) -> Any:
    """Group ``g``'s tokens ``[m0, m0 + BLOCK_M)``: its first sorted position, its slot,
    the places ``[BM]``, which of them lie in the group, and their tokens ``[BM]``."""
    start = tl.load(starts_ptr + g)
    slot = tl.load(slots_ptr + g)
    offs_m = m0 + tl.arange(0, BLOCK_M)  # [BM] places in the group
    in_group = offs_m < length
    token = tl.load(order_ptr + start + offs_m, mask=in_group, other=0)  # [BM]
    return start, slot, offs_m, in_group, token


@triton.jit  # type: ignore[untyped-decorator]
def _shrink(x_ptr: Any, a_ptr: Any, low_ptr: Any, order_ptr: Any, slots_ptr: Any,
            starts_ptr: Any, lengths_ptr: Any, k_dim: Any, rank: Any, stride_x: Any,
            stride_as: Any, stride_ar: Any, stride_low: Any, BLOCK_M: tl.constexpr,
            BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr) -> None:
    g = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    length = tl.load(lengths_ptr + g)
    if m0 < length:
        start, slot, offs_m, in_group, token = _tile(order_ptr, slots_ptr, starts_ptr, g,
                                                     m0, length, BLOCK_M)
        offs_r = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, k_dim, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xs = tl.load(x_ptr + token[:, None] * stride_x + offs_k[None, :],
                         mask=in_group[:, None] & (offs_k[None, :] < k_dim),
                         other=0.0)  # [BM, BK]
            at = tl.load(a_ptr + slot * stride_as + offs_r[None, :] * stride_ar
                         + offs_k[:, None],
                         mask=(offs_r[None, :] < rank) & (offs_k[:, None] < k_dim),
                         other=0.0)  # [BK, BR] = A_s^T
            if IEEE:  # fp32: no TF32 rounding of the inputs
                acc += tl.dot(xs, at, input_precision="ieee")
            else:
                acc += tl.dot(xs, at)
        tl.store(low_ptr + (start + offs_m)[:, None] * stride_low + offs_r[None, :], acc,
                 mask=in_group[:, None])


@triton.jit  # type: ignore[untyped-decorator]
def _expand(low_ptr: Any, b_ptr: Any, out_ptr: Any, order_ptr: Any, slots_ptr: Any,
            starts_ptr: Any, lengths_ptr: Any, n_dim: Any, rank: Any, stride_low: Any,
            stride_bs: Any, stride_bn: Any, stride_out: Any, BLOCK_M: tl.constexpr,
            BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr) -> None:
    g = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    length = tl.load(lengths_ptr + g)
    if m0 < length:
        start, slot, offs_m, in_group, token = _tile(order_ptr, slots_ptr, starts_ptr, g,
                                                     m0, length, BLOCK_M)
        offs_r = tl.arange(0, BLOCK_R)
        offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        low = tl.load(low_ptr + (start + offs_m)[:, None] * stride_low + offs_r[None, :],
                      mask=in_group[:, None], other=0.0)  # [BM, BR] fp32
        bt = tl.load(b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn + offs_r[:, None],
                     mask=(offs_r[:, None] < rank) & (offs_n[None, :] < n_dim),
                     other=0.0)  # [BR, BN] = B_s^T
        if IEEE:  # noqa: SIM108 (a constexpr branch: resolved when the kernel compiles)
            delta = tl.dot(low, bt, input_precision="ieee")  # [BM, BN] fp32
        else:
            delta = tl.dot(low.to(bt.dtype), bt)  # [BM, BN] fp32
        ptrs = out_ptr + token[:, None] * stride_out + offs_n[None, :]
        mask = in_group[:, None] & (offs_n[None, :] < n_dim)
        h = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, (h.to(tl.float32) + delta).to(out_ptr.dtype.element_ty), mask=mask)


def lora(h: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, groups: Groups,
         rank: int) -> torch.Tensor:
    """``h + B_s (A_s x)`` on the grouped tokens. ``h [N, out]``, ``x [N, in]``,
    ``a [S + 1, r_max, in]``, ``b [S + 1, out, r_max]`` (contiguous bank tensors)."""
    out = h.clone(memory_format=torch.contiguous_format)  # [N, out]
    x = x.contiguous()  # [N, in]
    routed = int(groups.order.shape[0])  # M
    if routed == 0 or rank == 0:
        return out
    block_r = max(16, triton.next_power_of_2(rank))
    ieee = x.dtype == torch.float32
    low = torch.empty(routed, block_r, dtype=torch.float32, device=x.device)  # [M, BR]
    count = int(groups.slots.shape[0])
    blocks = triton.cdiv(groups.longest, BLOCK_M)
    _shrink[(count, blocks)](
        x, a, low, groups.order, groups.slots, groups.starts, groups.lengths,
        x.shape[1], rank, x.stride(0), a.stride(0), a.stride(1), low.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_K=BLOCK_K, IEEE=ieee)
    _expand[(count, blocks, triton.cdiv(out.shape[1], BLOCK_N))](
        low, b, out, groups.order, groups.slots, groups.starts, groups.lengths,
        out.shape[1], rank, low.stride(0), b.stride(0), b.stride(1), out.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_N=BLOCK_N, IEEE=ieee)
    return out
