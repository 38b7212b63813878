"""The engine's attention: one packed step, and decode attention grouped by row length.

A packed step (:class:`PackedPlan`) is one forward over a flat sequence ``[1, T]``: one new
token of each of the ``B`` running rows and the prompt chunks of joining rows, each token
at its own row's position (the engine orders them by adapter slot, so that each slot's
tokens are one run the adapter banks read as a view). :func:`packed_attention` splits the
attention by part: the decode tokens over the KV slab (``[B, H, 1, D]`` queries against
slab views, see :mod:`tessera.engine.kvcache`), each chunk over its own row's keys
(``[1, H, n, D]`` queries against the row's earlier keys and its own, causal). No padding,
no mask over ``T x T``: a short prompt beside a long one costs its own length.

Decode rows share one slab view ``[B, H_kv, W + 1, D]`` (``W`` the longest row): plain SDPA
over it reads ``B x (W + 1)`` positions per layer, so one long row makes every short row
pay for its length (31 short rows beside a 1,024-token row: 32 x 1,025 positions instead of
about 31 x 140 + 1,025). :func:`decode_attention` splits it by length instead, without
copying the short rows:

- the base group is every row over the first ``w_0`` positions, a view of the slab (no
  copy); its output is kept for the rows that fit in ``w_0``;
- each further group holds the rows (sorted by length) up to its own width ``w_g``; they
  are gathered from the slab (``index_select`` of ``[n_g, H, w_g, D]``: the positions
  attention reads anyway) and their outputs overwrite the base group's.

:func:`plan` picks the cuts that minimise the positions read (a gathered position counts
twice: copied, then read) plus a fixed cost per group, by dynamic programming over the
sorted lengths, once per step on the host; the layers only follow it. When one group is
cheapest (rows of similar length, the usual case) there is no plan and the decode part
runs one SDPA with the full mask.

On the Triton kernels (``kernels``: ``auto`` on CUDA; :mod:`tessera.engine.ops`) the decode
part is one kernel over the slab view instead: each (row, head) program reads its row's
length on the device and walks only its positions, so there is no mask, no plan and no
gather, and nothing in it depends on the longest row (the step's shape aside).

The function is registered with transformers' attention interface as :data:`NAME` and set
on the engine's model whatever implementation it was loaded with; without a packed plan
(reference models, training, benchmarks of the plain model) it is plain ``sdpa``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tessera.adapters.ops import Backend
from tessera.adapters.plan import on_device
from tessera.engine import ops

NAME = "tessera_packed"
GROUP_COST = 64  # positions: the fixed cost of one more group (a gather, an SDPA call)


@dataclass(frozen=True)
class Group:
    """Rows attending over the first ``width`` positions of their slab rows."""

    rows: torch.Tensor | None  # [n] long: slab rows to gather; None = rows [0, B), a view
    width: int
    mask: torch.Tensor  # [n, 1, 1, width] additive: 0 where the row attends


@dataclass(frozen=True)
class DecodePlan:
    """One decode step's attention groups, in order: later groups overwrite the base."""

    groups: tuple[Group, ...]


def cuts(lengths: list[int], group_cost: int = GROUP_COST) -> tuple[int, list[int]]:
    """The cheapest split of rows by length: ``(base, ends)`` over the ascending order of
    ``lengths`` — the base group spans ``width(base)`` for every row (rows ``< base`` are
    its own), then gathered groups end (exclusive) at each of ``ends``. ``width(i)`` is
    ``sorted_lengths[i - 1] + 1``: a row's tokens and the new one."""
    w = [n + 1 for n in sorted(lengths)]  # ascending widths
    b = len(w)
    # tail[j]: cheapest cost of gathered groups covering sorted rows [j, b); nxt[j]: the end
    # of the first of them
    tail = [0] * (b + 1)
    nxt = [b] * (b + 1)
    for j in range(b - 1, -1, -1):
        best, arg = None, b
        for k in range(j + 1, b + 1):  # a group of rows [j, k), width w[k - 1]
            cost = 2 * (k - j) * w[k - 1] + group_cost + tail[k]
            if best is None or cost < best:
                best, arg = cost, k
        tail[j], nxt[j] = best or 0, arg
    base, best_total = b, b * w[-1] if w else 0
    for i in range(1, b):  # base group keeps sorted rows [0, i)
        total = b * w[i - 1] + tail[i]
        if total < best_total:
            base, best_total = i, total
    ends: list[int] = []
    j = base
    while j < b:
        j = nxt[j]
        ends.append(j)
    return base, ends


def plan(lengths: list[int], device: torch.device, dtype: torch.dtype,
         group_cost: int = GROUP_COST) -> DecodePlan | None:
    """The attention plan of a decode step whose rows hold ``lengths`` tokens (their new
    token not counted); None when one group over the whole width is cheapest."""
    base, ends = cuts(lengths, group_cost)
    if not ends:
        return None
    order = sorted(range(len(lengths)), key=lengths.__getitem__)  # slab rows by length
    all_lengths = on_device(lengths, device, torch.long)  # [B]
    width = lengths[order[base - 1]] + 1
    groups = [Group(None, width, _mask(all_lengths, width, dtype))]
    start = base
    for end in ends:
        rows = on_device(order[start:end], device, torch.long)  # [n]
        width = lengths[order[end - 1]] + 1
        groups.append(Group(rows, width, _mask(all_lengths[rows], width, dtype)))
        start = end
    return DecodePlan(tuple(groups))


def _mask(lengths: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """``[n, 1, 1, width]`` additive mask: row ``i`` attends to positions ``<= lengths[i]``
    (its tokens and its new one)."""
    span = torch.arange(width, device=lengths.device).unsqueeze(0)  # [1, width]
    attend = span <= lengths.unsqueeze(1)  # [n, width]
    mask = torch.zeros(attend.shape, dtype=dtype, device=lengths.device)
    return mask.masked_fill(~attend, torch.finfo(dtype).min)[:, None, None, :]


@dataclass
class LayerKV:
    """One layer's keys/values for a packed step's attention, left by the cache as the
    forward passes the layer (:class:`tessera.engine.kvcache.PackedLayer`)."""

    decode: tuple[torch.Tensor, torch.Tensor] | None = None  # slab views [B, H_kv, W + 1, D]
    chunks: list[tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=list)  # per chunk: its row's keys/values [1, H_kv, past + n, D]


@dataclass(frozen=True)
class Chunk:
    """A prefill chunk of one row: tokens ``[start, start + length)`` of the packed step."""

    start: int
    length: int
    mask: torch.Tensor | None  # [1, 1, n, past + n] additive; None: causal from position 0


@dataclass(frozen=True)
class PackedPlan:
    """One packed step's attention: one new token of each running row (slab row ``i``'s at
    packed position ``decode[i]``) and the prefill ``chunks``, in any order (the engine
    keeps each adapter slot's tokens together). ``kv`` (per layer) is filled by the cache
    during the forward."""

    decode: torch.Tensor  # [B] long: the decode tokens' packed positions, in slab row order
    decode_mask: torch.Tensor | None  # [B, 1, 1, W + 1] additive (None: no decode tokens,
    # or the Triton kernel, which reads ``lengths``)
    groups: DecodePlan | None  # decode attention grouped by row length; None: one group
    chunks: tuple[Chunk, ...]
    kv: tuple[LayerKV, ...]
    lengths: torch.Tensor  # [B] long: each decode row's tokens before this step
    kernel: Backend = "torch"  # the decode part's backend (tessera.engine.ops)


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None,
                     dropout: float = 0.0, scaling: float | None = None,
                     packed_plan: PackedPlan | None = None, **kwargs: Any
                     ) -> tuple[torch.Tensor, None]:
    """SDPA; with a ``packed_plan`` (the engine's step), per part of the packed sequence.

    query: [1, H, T, D] (T = decode rows + chunk tokens); key/value are ignored then: each
    part reads its own keys/values from ``packed_plan.kv``. Returns ``([1, T, H, D], None)``
    as transformers' attention functions do. (Each part writes only its own tokens' rows of
    the output, and every token belongs to one part.)"""
    if packed_plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    layer_idx = getattr(module, "layer_idx", None)
    if not isinstance(layer_idx, int):
        raise TypeError(f"{type(module).__name__} has no layer_idx: cannot run packed steps")
    kv = packed_plan.kv[layer_idx]
    _, heads, tokens, dim = query.shape
    out = query.new_empty((1, tokens, heads, dim))  # [1, T, H, D]
    index = packed_plan.decode  # [B]
    if index.numel():
        assert kv.decode is not None
        q = query[0].index_select(1, index).transpose(0, 1)  # [B, H, D]
        if packed_plan.kernel == "triton":  # each row over its own length, on the device
            part = ops.decode("triton")(q, *kv.decode, packed_plan.lengths,
                                        dim ** -0.5 if scaling is None else scaling)
        else:
            assert packed_plan.decode_mask is not None
            part = decode_attention(module, q.unsqueeze(2), *kv.decode,
                                    packed_plan.decode_mask, packed_plan.groups,
                                    dropout=dropout, scaling=scaling,
                                    **kwargs)[:, 0]  # [B, H, D]
        out[0].index_copy_(0, index, part)
    for chunk, (keys, values) in zip(packed_plan.chunks, kv.chunks, strict=True):
        end = chunk.start + chunk.length
        part, _ = sdpa_attention_forward(  # [1, n, H, D]; no mask: causal
            module, query[:, :, chunk.start:end], keys, values, chunk.mask,
            dropout=dropout, scaling=scaling, **kwargs)
        out[0, chunk.start:end] = part[0]
    return out, None


def decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, mask: torch.Tensor, groups: DecodePlan | None,
                     dropout: float = 0.0, scaling: float | None = None, **kwargs: Any
                     ) -> torch.Tensor:
    """One new token per row over the slab, grouped by row length where ``groups`` says.

    query: [B, H, 1, D]; key, value: [B, H_kv, W + 1, D] views of the slab; mask:
    [B, 1, 1, W + 1] additive. Returns [B, 1, H, D]."""
    if groups is None:
        out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout,
                                        scaling=scaling, **kwargs)
        return out
    base, *rest = groups.groups
    out, _ = sdpa_attention_forward(  # [B, 1, H, D]: valid for the base group's rows
        module, query, key[:, :, :base.width], value[:, :, :base.width], base.mask,
        dropout=dropout, scaling=scaling, **kwargs)
    for group in rest:
        rows = group.rows
        assert rows is not None  # gathered groups name their rows
        part, _ = sdpa_attention_forward(  # [n, 1, H, D]
            module, query.index_select(0, rows),
            key[:, :, :group.width].index_select(0, rows),  # [n, H_kv, w_g, D] (copy)
            value[:, :, :group.width].index_select(0, rows), group.mask,
            dropout=dropout, scaling=scaling, **kwargs)
        out = out.index_copy(0, rows, part)
    return out


def install(model: Any) -> None:
    """Run ``model``'s attention through :func:`packed_attention` (plain SDPA unless a
    packed plan is given): the engine's steps need it."""
    try:
        model.set_attn_implementation(NAME)
    except Exception as exc:
        raise ValueError(f"{type(model).__name__} does not run its attention through "
                         "transformers' AttentionInterface; the engine needs it") from exc


AttentionInterface.register(NAME, packed_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
