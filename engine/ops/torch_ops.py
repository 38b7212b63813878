"""Plain-torch backend of :mod:`tessera.engine.ops` (any device; no host reads)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
           scale: float) -> torch.Tensor:
    """SDPA over the whole width ``W``, masked to each row's positions ``[0, lengths[i]]``.
    ``q [B, H, D]``, ``keys``/``values`` ``[B, H_kv, W, D]``, ``lengths [B]`` -> ``[B, H, D]``."""
    width = keys.shape[2]
    span = torch.arange(width, device=q.device)  # [W]
    attend = span.unsqueeze(0) <= lengths.unsqueeze(1)  # [B, W]
    mask = torch.zeros(attend.shape, dtype=q.dtype, device=q.device).masked_fill(
        ~attend, torch.finfo(q.dtype).min)  # [B, W] additive
    out = F.scaled_dot_product_attention(  # [B, H, 1, D]
        q.unsqueeze(2), keys, values, attn_mask=mask[:, None, None, :], scale=scale,
        enable_gqa=q.shape[1] != keys.shape[1])
    return out.squeeze(2)
