"""Low-rank additive term ``y += B (A x)`` (LoRA, rsLoRA, DoRA's direction, HRA's WY form).

The method's scale is folded into ``B`` when lowering, so the bank is scale-free.

Gather mode has two forms, chosen by how many distinct slots ``U`` the ``N`` tokens use:
- *stacked* (``2 U <= N``): the active slots' factors are read once and stacked,
  ``H = X A_stack^T`` ``[N, U r]``, masked to each token's own block, ``Y = H B_stack``:
  two GEMMs reading each adapter once (what makes decode with a few hot adapters cheap);
- *per-token* (``U`` close to ``N``): gather each token's ``A``, ``B`` and run two bmm.
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
        if 2 * len(active) <= routing.num_tokens:
            return self.apply_stacked(routing, active, h, x)
        return self.apply_per_token(routing, active, h, x)

    def apply_stacked(self, routing: Routing, active: list[int], h: torch.Tensor,
                      x: torch.Tensor) -> torch.Tensor:
        r, u = self.max_rank(active), len(active)
        slots, onehot = routing.membership(active)  # [U], [N, U]
        a = self.t["A"].index_select(0, slots)[:, :r].reshape(u * r, -1)  # [U r, in]
        b = self.t["B"].index_select(0, slots)[:, :, :r]  # [U, out, r]
        b = b.transpose(0, 1).reshape(b.shape[1], u * r)  # [out, U r]
        low = (x @ a.t()).view(-1, u, r)  # [N, U, r]: every token against every active A
        # keep each token's own slot block; masked_fill, not a multiply: an overflow in
        # another tenant's block (inf * 0 = NaN) must not reach this token
        low = low.masked_fill(~onehot.unsqueeze(-1), 0.0)
        return torch.addmm(h, low.view(-1, u * r), b.t())  # [N, out]

    def apply_per_token(self, routing: Routing, active: list[int], h: torch.Tensor,
                        x: torch.Tensor) -> torch.Tensor:
        r = self.max_rank(active)
        a = self.t["A"][routing.index, :r]  # [N, r, in]
        b = self.t["B"][routing.index, :, :r]  # [N, out, r]
        low = torch.bmm(a, x.unsqueeze(-1))  # [N, r, 1]
        return h + torch.bmm(b, low).squeeze(-1)  # [N, out]
