"""Per-input-feature affine map ``x' = gamma * x + beta`` before the base GEMM (HUT).

An empty slot holds ``gamma = 1``, ``beta = 0``, so the null row is an exact identity
(``1 * x + 0 == x`` in floating point) and gathered base-only tokens are untouched.
"""

from __future__ import annotations

import torch

from tessera.adapters.banks.base import Bank
from tessera.adapters.method import Limits
from tessera.adapters.plan import Routing
from tessera.adapters.targets import TargetInfo


def affine_reference(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Plain-torch yardstick: ``x: [N, in]``, ``gamma, beta: [in]`` -> ``[N, in]``."""
    return x * gamma.unsqueeze(0) + beta.unsqueeze(0)


class AffineBank(Bank):
    kind = "affine"
    stage = "input"
    fills = {"gamma": 1.0, "beta": 0.0}

    @classmethod
    def shapes(cls, target: TargetInfo, limits: Limits) -> dict[str, tuple[int, ...]]:
        return {"gamma": (target.in_features,),  # [in]
                "beta": (target.in_features,)}  # [in]

    def apply_slot(self, slot: int, h: torch.Tensor, x: torch.Tensor,
                   weight: torch.Tensor) -> torch.Tensor:
        # out-of-place: h may be the caller's activation
        return torch.addcmul(self.t["beta"][slot], h, self.t["gamma"][slot])  # [n, in]

    def apply_tokens(self, routing: Routing, active: list[int], h: torch.Tensor,
                     x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        gamma = routing.take(self.t["gamma"])  # [N, in]
        beta = routing.take(self.t["beta"])  # [N, in]
        return torch.addcmul(beta, h, gamma)  # [N, in]
