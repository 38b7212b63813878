"""Hadamard-product term against the *shared* base weight (HUT):

    y += sum_j a_j ⊙ (W0 (c_j ⊙ x)),   a: [r_max, out],  c: [r_max, in]

which equals ``(W0 ⊙ sum_j a_j c_j^T) x`` without building a per-adapter dense weight. Each
token's ``r`` scaled copies of ``x`` are stacked and multiplied by W0 in one GEMM: W0 is read
once per layer however many adapters the batch holds (decode stays memory-bound), at ``r``
times the base FLOPs. Empty rows (``a = c = 0``) add exactly zero; ``slot_rank`` skips them.
"""

from __future__ import annotations

import torch

from tessera.adapters.banks.base import Bank
from tessera.adapters.method import Limits
from tessera.adapters.plan import Routing
from tessera.adapters.targets import TargetInfo


def hadamard_reference(x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor,
                       c: torch.Tensor) -> torch.Tensor:
    """Plain-torch yardstick building the dense weight: ``(W0 ⊙ a^T c) x``.
    ``x: [N, in]``, ``weight: [out, in]``, ``a: [r, out]``, ``c: [r, in]`` -> ``[N, out]``."""
    dense = weight * (a.t() @ c)  # [out, in]
    return x @ dense.t()  # [N, out]


def _stacked(x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor,
             c: torch.Tensor) -> torch.Tensor:
    """``sum_j a_j ⊙ W0 (c_j ⊙ x)`` for ``x: [N, in]``, ``a: [N or 1, r, out]``,
    ``c: [N or 1, r, in]`` -> ``[N, out]``."""
    n, r = x.shape[0], a.shape[1]
    scaled = x.unsqueeze(1) * c  # [N, r, in]: r scaled copies per token
    z = scaled.reshape(n * r, -1) @ weight.t()  # [N * r, out]: one GEMM against W0
    return (z.reshape(n, r, -1) * a).sum(dim=1)  # [N, out]


class HadamardBank(Bank):
    kind = "hadamard"
    stage = "delta"
    fills = {"a": 0.0, "c": 0.0}
    rank_tensor = ("c", 0)

    @classmethod
    def shapes(cls, target: TargetInfo, limits: Limits) -> dict[str, tuple[int, ...]]:
        return {"a": (limits.max_rank, target.out_features),  # [r_max, out]
                "c": (limits.max_rank, target.in_features)}  # [r_max, in]

    def apply_slot(self, slot: int, h: torch.Tensor, x: torch.Tensor,
                   weight: torch.Tensor) -> torch.Tensor:
        r = self.slot_rank[slot]
        if r == 0:
            return h
        a = self.t["a"][slot, :r].unsqueeze(0)  # [1, r, out]
        c = self.t["c"][slot, :r].unsqueeze(0)  # [1, r, in]
        return h + _stacked(x, weight, a, c)  # [n, out]

    def apply_tokens(self, routing: Routing, active: list[int], h: torch.Tensor,
                     x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        r = self.max_rank(active)
        if r == 0:
            return h
        a = self.t["a"][routing.index, :r]  # [N, r, out]
        c = self.t["c"][routing.index, :r]  # [N, r, in]
        return h + _stacked(x, weight, a, c)  # [N, out]
