from __future__ import annotations

import torch
from torch import nn

from tessera.adapters.method import Adapter, Component
from tessera.adapters.methods.hut import HutConfig
from tests.factories import factory, per_target, randn

TARGETS = ["q_proj", "v_proj", "down_proj", "c_attn", "c_fc"]


def hut_modules(model: nn.Module, config: HutConfig, gen: torch.Generator
                ) -> dict[str, dict[str, torch.Tensor]]:
    """Random, non-identity HUT weights (M_B != 0, gamma != 1, beta != 0)."""
    return per_target(model, config.target_modules, lambda t: {
        "hut_A": randn(gen, t.out_features, config.r, scale=0.5),
        "hut_B": randn(gen, config.r, t.in_features, scale=0.5),
        "hut_gamma": 1.0 + randn(gen, t.in_features),
        "hut_beta": randn(gen, t.in_features, scale=0.1)})


@factory("hut")
def make_hut(model: nn.Module, gen: torch.Generator) -> Adapter:
    rank = int(torch.randint(2, 6, (1,), generator=gen))
    config = HutConfig(r=rank, alpha=float(rank + 1), target_modules=TARGETS)
    return Adapter((Component("hut", config, hut_modules(model, config, gen)),))
