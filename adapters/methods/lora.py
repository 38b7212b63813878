"""LoRA and rsLoRA (PEFT semantics).

``y = W0 x + b + s * B (A x)``, ``A: [r, in]``, ``B: [out, r]``, ``s = alpha / r``
(``alpha / sqrt(r)`` with ``use_rslora``). ``rank_pattern`` / ``alpha_pattern`` override r
and alpha per module (PEFT's regex-suffix rule). For GPT-2's Conv1D the A and B tensors keep
these Linear shapes (PEFT's ``fan_in_fan_out`` only concerns the base weight's layout).
Merge: ``W' = W0 + s B A``. Mixed batch: the ``lowrank`` bank with ``s`` folded into B.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from tessera.adapters.method import Method, MethodConfig, PositiveScale, Rank, SlotData, Tensors
from tessera.adapters.registry import register
from tessera.adapters.targets import TargetInfo, pattern_value


class LoraConfig(MethodConfig):
    r: Rank = 8
    lora_alpha: PositiveScale = 8.0
    target_modules: list[str] | str
    use_rslora: bool = False
    rank_pattern: dict[str, Rank] = Field(default_factory=dict)
    alpha_pattern: dict[str, PositiveScale] = Field(default_factory=dict)

    def rank_of(self, path: str) -> int:
        return pattern_value(self.rank_pattern, path, self.r)

    def scale_of(self, path: str) -> float:
        r = self.rank_of(path)
        alpha = pattern_value(self.alpha_pattern, path, self.lora_alpha)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


class LoRA(Method[LoraConfig]):
    name = "lora"
    config_type = LoraConfig
    banks = ("lowrank",)

    def schema(self, config: LoraConfig, target: TargetInfo) -> dict[str, tuple[int, ...]]:
        r = config.rank_of(target.path)
        return {"lora_A": (r, target.in_features), "lora_B": (target.out_features, r)}

    def rank(self, config: LoraConfig, target: TargetInfo) -> int:
        return config.rank_of(target.path)

    def delta(self, config: LoraConfig, tensors: Tensors, target: TargetInfo) -> torch.Tensor:
        """``s B A`` ``[out, in]``."""
        return config.scale_of(target.path) * (tensors["lora_B"] @ tensors["lora_A"])

    def reference(self, config: LoraConfig, tensors: Tensors, target: TargetInfo,
                  weight: torch.Tensor, bias: torch.Tensor | None,
                  x: torch.Tensor) -> torch.Tensor:
        s = config.scale_of(target.path)
        low = x @ tensors["lora_A"].t()  # [N, r]
        return F.linear(x, weight, bias) + s * (low @ tensors["lora_B"].t())  # [N, out]

    def merge(self, config: LoraConfig, tensors: Tensors, target: TargetInfo,
              weight: torch.Tensor, bias: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return weight + self.delta(config, tensors, target).to(weight.dtype), bias

    def lower(self, config: LoraConfig, tensors: Tensors, target: TargetInfo,
              weight: torch.Tensor) -> dict[str, SlotData]:
        s = config.scale_of(target.path)
        return {"lowrank": SlotData({"A": tensors["lora_A"], "B": s * tensors["lora_B"]})}


register(LoRA())
