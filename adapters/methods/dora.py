"""DoRA: weight-decomposed low-rank adaptation (PEFT ``LoraConfig(use_dora=True)``).

Tensors per module: LoRA's ``lora_A [r, in]`` and ``lora_B [out, r]`` plus the magnitude
``lora_magnitude_vector m [out]``. With ``s`` LoRA's scale (``alpha / r`` or rsLoRA's
``alpha / sqrt(r)``, per-module patterns included)::

    V = W0 + s B A                      # [out, in]
    g = m / ||V||_row                   # [out], L2 norm over the input dimension
    y = g * (W0 x + s B A x) + b        # bias is not scaled

PEFT (``tuners/lora/dora.py``) treats the norm as a constant (detached) and computes it on
``transpose(W, fan_in_fan_out)``, i.e. always on the ``[out, in]`` orientation: for GPT-2's
Conv1D the norm is still one value per *output* feature. ``g`` depends only on the adapter
and W0, so it is computed once when lowering. Merge: ``W' = diag(g) V``. Mixed batch:
LoRA's ``lowrank`` bank (``A``, ``s B``, lowered by LoRA's own code) plus the ``rowscale``
bank (``g``), which the layer applies after the low-rank term and before the bias.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from tessera.adapters.errors import AdapterValidationError
from tessera.adapters.method import Method, SlotData, Tensors
from tessera.adapters.methods.lora import LoRA, LoraConfig
from tessera.adapters.registry import register
from tessera.adapters.targets import TargetInfo

MAGNITUDE = "lora_magnitude_vector"


class DoraConfig(LoraConfig):
    """Same fields as LoRA (r, lora_alpha, target_modules, use_rslora, rank/alpha patterns)."""


class DoRA(Method[LoraConfig]):
    name = "dora"
    config_type = DoraConfig
    banks = ("lowrank", "rowscale")
    lora: ClassVar[LoRA] = LoRA()  # LoRA's schema, scale and lowering, reused as they are

    def schema(self, config: LoraConfig, target: TargetInfo) -> dict[str, tuple[int, ...]]:
        return {**self.lora.schema(config, target), MAGNITUDE: (target.out_features,)}

    def rank(self, config: LoraConfig, target: TargetInfo) -> int:
        return self.lora.rank(config, target)

    def delta(self, config: LoraConfig, tensors: Tensors, target: TargetInfo) -> torch.Tensor:
        """``s B A`` ``[out, in]``."""
        return self.lora.delta(config, tensors, target)

    def row_scale(self, config: LoraConfig, tensors: Tensors, target: TargetInfo,
                  weight: torch.Tensor) -> torch.Tensor:
        """``g = m / ||W0 + s B A||_row`` ``[out]`` (constant w.r.t. x, as in PEFT)."""
        direction = weight + self.delta(config, tensors, target).to(weight.dtype)  # [out, in]
        norm: torch.Tensor = direction.norm(dim=1)  # [out]
        g = tensors[MAGNITUDE].to(weight.dtype) / norm  # [out]
        if not bool(torch.isfinite(g).all()):
            raise AdapterValidationError(
                "W0 + s B A has a zero-norm row: the DoRA scale m / ||V|| is not finite",
                tensor=f"{target.path}.{MAGNITUDE}")
        return g

    def reference(self, config: LoraConfig, tensors: Tensors, target: TargetInfo,
                  weight: torch.Tensor, bias: torch.Tensor | None,
                  x: torch.Tensor) -> torch.Tensor:
        s = config.scale_of(target.path)
        g = self.row_scale(config, tensors, target, weight)  # [out]
        low = x @ tensors["lora_A"].t()  # [N, r]
        direction = F.linear(x, weight) + s * (low @ tensors["lora_B"].t())  # [N, out]
        y = g * direction  # [N, out]
        return y if bias is None else y + bias

    def merge(self, config: LoraConfig, tensors: Tensors, target: TargetInfo,
              weight: torch.Tensor, bias: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        g = self.row_scale(config, tensors, target, weight)  # [out]
        v = weight + self.delta(config, tensors, target).to(weight.dtype)  # [out, in]
        return g.unsqueeze(1) * v, bias  # diag(g) V

    def lower(self, config: LoraConfig, tensors: Tensors, target: TargetInfo,
              weight: torch.Tensor) -> dict[str, SlotData]:
        return {**self.lora.lower(config, tensors, target, weight),
                "rowscale": SlotData({"g": self.row_scale(config, tensors, target, weight)})}


register(DoRA())
