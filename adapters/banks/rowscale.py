"""Per-output-row scale ``y *= g`` applied before the bias (DoRA's magnitude / norm)."""

from __future__ import annotations

import torch

from tessera.adapters.banks.base import Bank
from tessera.adapters.method import Limits
from tessera.adapters.plan import Routing
from tessera.adapters.targets import TargetInfo


class RowScaleBank(Bank):
    kind = "rowscale"
    stage = "scale"
    fills = {"g": 1.0}

    @classmethod
    def shapes(cls, target: TargetInfo, limits: Limits) -> dict[str, tuple[int, ...]]:
        return {"g": (target.out_features,)}  # [out]

    def apply_slot(self, slot: int, h: torch.Tensor, x: torch.Tensor,
                   weight: torch.Tensor) -> torch.Tensor:
        return h * self.t["g"][slot]  # [n, out]

    def apply_tokens(self, routing: Routing, active: list[int], h: torch.Tensor,
                     x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return h * routing.take(self.t["g"])  # [N, out]

    def apply_static(self, h: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
        """``h`` times each token's ``g`` (``slot_ids`` ``[N]`` on the device, -1 = the
        null row's ones): one gather and one multiply whatever the slots (a static step,
        :meth:`~tessera.adapters.plan.StepMeta.begin_static`)."""
        index = torch.where(slot_ids < 0, self.num_slots, slot_ids)  # [N]
        return h * self.t["g"].index_select(0, index)  # [N, out]
