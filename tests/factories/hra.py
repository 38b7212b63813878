from __future__ import annotations

import torch
from torch import nn

from tessera.adapters.method import Adapter, Component
from tessera.adapters.methods.hra import HraConfig
from tests.factories import factory, per_target, randn

# two components on disjoint modules, so every draw covers both apply_GS modes
FIRST = ["q_proj", "c_attn"]
SECOND = ["v_proj", "o_proj", "c_proj"]


def hra_modules(model: nn.Module, config: HraConfig, gen: torch.Generator
                ) -> dict[str, dict[str, torch.Tensor]]:
    """Random reflection vectors: independent columns (PEFT's paired init would be R = I)."""
    return per_target(model, config.target_modules,
                      lambda t: {"hra_u": randn(gen, t.in_features, config.r, scale=1.0)})


@factory("hra")
def make_hra(model: nn.Module, gen: torch.Generator) -> Adapter:
    odd_rank = 2 * int(torch.randint(0, 4, (1,), generator=gen)) + 1  # 1, 3, 5 or 7
    any_rank = int(torch.randint(2, 8, (1,), generator=gen))
    gs_first = bool(torch.randint(0, 2, (1,), generator=gen))
    first = HraConfig(r=odd_rank, apply_GS=gs_first, target_modules=FIRST)
    second = HraConfig(r=any_rank, apply_GS=not gs_first, target_modules=SECOND)
    return Adapter((Component("hra", first, hra_modules(model, first, gen)),
                    Component("hra", second, hra_modules(model, second, gen))))
