"""Plain-torch backend of :mod:`tessera.adapters.ops` (any device; no host reads)."""

from __future__ import annotations

import torch

from tessera.adapters.plan import Groups


def lora(h: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, groups: Groups,
         rank: int) -> torch.Tensor:
    """``h + B_s (A_s x)`` on the grouped tokens (BGMV-like: each token's factors gathered).
    ``h [N, out]``, ``x [N, in]``, ``a [S + 1, r_max, in]``, ``b [S + 1, out, r_max]``."""
    tokens = groups.order  # [M]
    slot = torch.repeat_interleave(groups.slots, groups.lengths,
                                   output_size=int(tokens.shape[0]))  # [M] slot per token
    a_m = a[:, :rank].index_select(0, slot)  # [M, r, in]
    b_m = b[:, :, :rank].index_select(0, slot)  # [M, out, r]
    low = torch.bmm(x.index_select(0, tokens).unsqueeze(1), a_m.transpose(1, 2))  # [M, 1, r]
    delta = torch.bmm(low, b_m.transpose(1, 2)).squeeze(1)  # [M, out]
    return h.index_add(0, tokens, delta)  # [N, out]
