"""SoKA — SVD on Kronecker adaptation (after arXiv 2506.15251).

``y = (W0 + dW) x + b`` with ``dW = s * sum_j A_j ⊗ B_j``, ``A_j: [m, n]``, ``B_j: [p, q]``,
``out = m p``, ``in = n q``. ``s`` is ``scale`` itself (no ``1 / r``: a KPSVD init holds
terms already at W0's magnitude, and rescaling them by rank would break that).

Factor shapes are not free: the pool preallocates a ``kron`` bank on every wrapped module,
so ``(m, n, p, q)`` is :func:`tessera.adapters.banks.kron.kron_factors` of ``(out, in)`` — the most
square split of each dimension. The schema uses that rule, so weights of another
factorization fail validation on their shape; an artifact may also *declare* its factors
per module (``factors``, as :mod:`tessera.adapters.kpsvd` writes them) and a declaration that
differs from the rule is refused with a message saying so.

Tensors per module: ``soka_A`` ``[r, m, n]``, ``soka_B`` ``[r, p, q]``; ``r`` (the number of
terms) is ``rank_pattern``'s value for the module, else ``r``, and is checked against
``Limits.max_rank``. ``selection`` records how the ranks were chosen (energy threshold,
elbow); it is metadata, never used by the math.

The served weights are always terms to *add to the frozen W0*; a PiSSA-like training run
(base = W0 - init) is exported that way by :func:`tessera.adapters.kpsvd.export_delta`.
Merge: ``W' = W0 + dW``. Mixed batch: the ``kron`` bank, ``s`` folded into A.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from tessera.adapters.banks.kron import KronFactors, kron_factors
from tessera.adapters.errors import AdapterValidationError
from tessera.adapters.method import (
    Method,
    MethodConfig,
    PositiveFraction,
    Rank,
    Scale,
    Size,
    SlotData,
    Tensors,
)
from tessera.adapters.registry import register
from tessera.adapters.targets import TargetInfo, pattern_value


class RankSelection(MethodConfig):
    """How the per-module numbers of terms were chosen from the KPSVD spectra."""

    rule: Literal["energy", "elbow", "fixed"]
    tau: PositiveFraction | None = Field(None, description="energy threshold")
    energy_rank: dict[str, Rank] = Field(default_factory=dict)  # module path -> rank
    elbow_rank: dict[str, Rank] = Field(default_factory=dict)  # module path -> rank


class SokaConfig(MethodConfig):
    r: Rank = Field(8, description="number of Kronecker terms")
    scale: Scale = Field(1.0, description="s in dW = s * sum_j A_j ⊗ B_j")
    target_modules: list[str] | str
    rank_pattern: dict[str, Rank] = Field(default_factory=dict)  # PEFT-style per-module r
    factors: dict[str, list[Size]] = Field(
        default_factory=dict, description="module path -> declared [m, n, p, q]")
    selection: RankSelection | None = None

    def rank_of(self, path: str) -> int:
        return pattern_value(self.rank_pattern, path, self.r)


def factors_of(config: SokaConfig, target: TargetInfo) -> KronFactors:
    """The rule's factors for this module; a contradicting declaration is refused."""
    rule = kron_factors(target.out_features, target.in_features)
    declared = config.factors.get(target.path)
    if declared is not None and tuple(declared) != tuple(rule):
        raise AdapterValidationError(
            f"declared Kronecker factors [m, n, p, q] = {list(declared)} differ from "
            f"tessera's rule {list(rule)} for a [{target.out_features}, "
            f"{target.in_features}] weight (most square split of out and in); re-export "
            "the adapter with tessera.adapters.kpsvd.kron_factors", tensor=f"{target.path}.soka_A")
    return rule


class SoKA(Method[SokaConfig]):
    name = "soka"
    config_type = SokaConfig
    banks = ("kron",)

    def schema(self, config: SokaConfig, target: TargetInfo) -> dict[str, tuple[int, ...]]:
        f = factors_of(config, target)
        r = config.rank_of(target.path)
        return {"soka_A": (r, f.m, f.n), "soka_B": (r, f.p, f.q)}

    def rank(self, config: SokaConfig, target: TargetInfo) -> int:
        return config.rank_of(target.path)

    def delta(self, config: SokaConfig, tensors: Tensors) -> torch.Tensor:
        """``dW = s * sum_j A_j ⊗ B_j`` ``[out, in]``, built densely with ``torch.kron``."""
        a, b = tensors["soka_A"], tensors["soka_B"]  # [r, m, n], [r, p, q]
        delta = torch.zeros(a.shape[1] * b.shape[1], a.shape[2] * b.shape[2],
                            dtype=a.dtype, device=a.device)  # [out, in]
        for j in range(a.shape[0]):
            delta = delta + torch.kron(a[j], b[j])  # [m p, n q]
        return config.scale * delta

    def reference(self, config: SokaConfig, tensors: Tensors, target: TargetInfo,
                  weight: torch.Tensor, bias: torch.Tensor | None,
                  x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, bias) + x @ self.delta(config, tensors).t()  # [N, out]

    def merge(self, config: SokaConfig, tensors: Tensors, target: TargetInfo,
              weight: torch.Tensor, bias: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return weight + self.delta(config, tensors).to(weight.dtype), bias

    def lower(self, config: SokaConfig, tensors: Tensors, target: TargetInfo,
              weight: torch.Tensor) -> dict[str, SlotData]:
        return {"kron": SlotData({"A": config.scale * tensors["soka_A"],  # [r, m, n]
                                  "B": tensors["soka_B"]})}  # [r, p, q]


register(SoKA())
