"""Decode attention over the KV slab, grouped by row length.

A decode step's rows share one slab view ``[B, H_kv, W + 1, D]`` (``W`` the longest row):
plain SDPA over it reads ``B x (W + 1)`` positions per layer, so one long row makes every
short row pay for its length (31 short rows beside a 1,024-token row: 32 x 1,025
positions instead of about 31 x 140 + 1,025). This module splits the attention by length
instead, without copying the short rows:

- the base group is every row over the first ``w_0`` positions, a view of the slab (no
  copy); its output is kept for the rows that fit in ``w_0``;
- each further group holds the rows (sorted by length) up to its own width ``w_g``; they
  are gathered from the slab (``index_select`` of ``[n_g, H, w_g, D]``: the positions
  attention reads anyway) and their outputs overwrite the base group's.

:func:`plan` picks the cuts that minimise the positions read (a gathered position counts
twice: copied, then read) plus a fixed cost per group, by dynamic programming over the
sorted lengths, once per step on the host; the layers only follow it. When one group is
cheapest (rows of similar length, the usual case) there is no plan and the step runs
plain SDPA with the full mask, exactly as before.

The function is registered with transformers' attention interface as :data:`NAME` and
set on the engine's model only where the model runs ``sdpa``; without a plan (prefill,
reference models, training) it is plain ``sdpa``. A GPU varlen/paged kernel replaces this
where one runs; the plan is the CPU's way to the same cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "tessera_slab"
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
    all_lengths = torch.tensor(lengths, dtype=torch.long, device=device)  # [B]
    width = lengths[order[base - 1]] + 1
    groups = [Group(None, width, _mask(all_lengths, width, dtype))]
    start = base
    for end in ends:
        rows = torch.tensor(order[start:end], dtype=torch.long, device=device)  # [n]
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


def slab_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor, attention_mask: torch.Tensor | None,
                   dropout: float = 0.0, scaling: float | None = None,
                   slab_plan: DecodePlan | None = None, **kwargs: Any
                   ) -> tuple[torch.Tensor, None]:
    """SDPA; with a ``slab_plan`` (decode over the slab), grouped by length.

    query: [B, H, 1, D]; key, value: [B, H_kv, W + 1, D] views of the slab. Returns
    ``([B, 1, H, D], None)`` as transformers' attention functions do."""
    if slab_plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    base, *rest = slab_plan.groups
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
    return out, None


def install(model: Any) -> bool:
    """Run ``model``'s attention through :func:`slab_attention` where it runs ``sdpa``
    (other implementations are left alone); True if installed."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(NAME)
    return True


AttentionInterface.register(NAME, slab_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
