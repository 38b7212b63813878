"""HUT — Hadamard updated transformation (after arXiv 2409.13501).

This is *our reading* of the paper (its body was not available to us, only the abstract's
paradigm: transform the weight directly, ``W_new = U(W0) = W0 + U'(W0)``, so the update
stays correlated with W0; two low-rank matrices combined with W0 by a Hadamard product,
plus a scale and shift of the input). tessera's formulation::

    W_h = W0 ⊙ (1 + s * M_A M_B)          M_A: [out, r],  M_B: [r, in]
    y   = W_h (gamma ⊙ x + beta) + b      gamma, beta: [in]

with ``s = alpha / r`` (LoRA's convention: the update's magnitude at a given init does not
grow with r; ``alpha = r`` gives ``s = 1``). Init ``M_B = 0``, ``gamma = 1``, ``beta = 0``
is the identity. Tensors per module: ``hut_A`` (M_A), ``hut_B`` (M_B), ``hut_gamma``,
``hut_beta``.

Merge: ``W' = W_h diag(gamma)``, ``b' = b + W_h beta`` (a bias appears on a bias-free layer
when ``beta != 0``). Mixed batch, no dense per-adapter weight: the ``affine`` input bank
holds ``(gamma, beta)`` and the ``hadamard`` delta bank uses
``(W0 ⊙ a c^T) x = a ⊙ (W0 (c ⊙ x))`` with ``a_j = s M_A[:, j]``, ``c_j = M_B[j, :]``:
``W_h x' = W0 x' + sum_j a_j ⊙ W0 (c_j ⊙ x')`` — r extra products against the shared W0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from tessera.adapters.method import Method, MethodConfig, PositiveScale, Rank, SlotData, Tensors
from tessera.adapters.registry import register
from tessera.adapters.targets import TargetInfo


class HutConfig(MethodConfig):
    r: Rank = Field(8, description="rank of M_A M_B")
    alpha: PositiveScale = Field(8.0, description="s = alpha / r scales M_A M_B")
    target_modules: list[str] | str

    @property
    def scale(self) -> float:
        return self.alpha / self.r


class HUT(Method[HutConfig]):
    name = "hut"
    config_type = HutConfig
    banks = ("affine", "hadamard")

    def schema(self, config: HutConfig, target: TargetInfo) -> dict[str, tuple[int, ...]]:
        return {"hut_A": (target.out_features, config.r),  # M_A [out, r]
                "hut_B": (config.r, target.in_features),  # M_B [r, in]
                "hut_gamma": (target.in_features,),  # [in]
                "hut_beta": (target.in_features,)}  # [in]

    def rank(self, config: HutConfig, target: TargetInfo) -> int:
        return config.r

    def transformed_weight(self, config: HutConfig, tensors: Tensors,
                           weight: torch.Tensor) -> torch.Tensor:
        """``W_h = W0 ⊙ (1 + s M_A M_B)`` ``[out, in]``, built densely."""
        low = tensors["hut_A"] @ tensors["hut_B"]  # [out, in]
        return weight * (1.0 + config.scale * low)  # [out, in]

    def reference(self, config: HutConfig, tensors: Tensors, target: TargetInfo,
                  weight: torch.Tensor, bias: torch.Tensor | None,
                  x: torch.Tensor) -> torch.Tensor:
        w_h = self.transformed_weight(config, tensors, weight)  # [out, in]
        x_in = tensors["hut_gamma"] * x + tensors["hut_beta"]  # [N, in]
        return F.linear(x_in, w_h, bias)  # [N, out]

    def merge(self, config: HutConfig, tensors: Tensors, target: TargetInfo,
              weight: torch.Tensor, bias: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        w_h = self.transformed_weight(config, tensors, weight)  # [out, in]
        beta = tensors["hut_beta"]  # [in]
        new_w = w_h * tensors["hut_gamma"].unsqueeze(0)  # [out, in] = W_h diag(gamma)
        if bias is None and not bool(beta.any()):
            return new_w, None  # nothing to shift: keep a bias-free layer bias-free
        shift = w_h @ beta  # [out]
        return new_w, shift if bias is None else bias + shift

    def lower(self, config: HutConfig, tensors: Tensors, target: TargetInfo,
              weight: torch.Tensor) -> dict[str, SlotData]:
        return {
            "affine": SlotData({"gamma": tensors["hut_gamma"], "beta": tensors["hut_beta"]}),
            "hadamard": SlotData({"a": config.scale * tensors["hut_A"].t(),  # [r, out]
                                  "c": tensors["hut_B"]}),  # [r, in]
        }


register(HUT())
