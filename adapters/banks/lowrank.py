"""Low-rank additive term ``y += B (A x)`` (LoRA, rsLoRA, DoRA's direction, HRA's WY form).

The method's scale is folded into ``B`` when lowering, so the bank is scale-free.
"""

from __future__ import annotations

import torch

from adapters.banks.base import Bank
from adapters.method import Limits
from adapters.plan import Routing
from adapters.targets import TargetInfo


class LowRankBank(Bank):
    kind = "lowrank"
    stage = "delta"
    fills = {"A": 0.0, "B": 0.0}
    rank_tensor = ("A", 0)

    @classmethod
    def shapes(cls, target: TargetInfo, limits: Limits) -> dict[str, tuple[int, ...]]:
        return {"A": (limits.max_rank, target.in_features),   # [r_max, in]
                "B": (target.out_features, limits.max_rank)}  # [out, r_max]

    def apply_slot(self, slot: int, h: torch.Tensor, x: torch.Tensor,
                   weight: torch.Tensor) -> torch.Tensor:
        r = self.slot_rank[slot]
        a = self.t["A"][slot, :r]  # [r, in]
        b = self.t["B"][slot, :, :r]  # [out, r]
        return torch.addmm(h, x @ a.t(), b.t())  # [n, out]

    def apply_tokens(self, routing: Routing, active: list[int], h: torch.Tensor,
                     x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        r = self.max_rank(active)
        a = self.t["A"][routing.index, :r]  # [N, r, in]
        b = self.t["B"][routing.index, :, :r]  # [N, out, r]
        low = torch.bmm(a, x.unsqueeze(-1))  # [N, r, 1]
        return h + torch.bmm(b, low).squeeze(-1)  # [N, out]
