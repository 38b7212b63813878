from __future__ import annotations

import torch
from torch import nn

from tessera.adapters.banks.kron import kron_factors
from tessera.adapters.method import Adapter, Component
from tessera.adapters.methods.soka import SokaConfig
from tessera.adapters.targets import TargetInfo
from tests.factories import factory, per_target, randn

TARGETS = ["q_proj", "v_proj", "up_proj", "c_attn", "c_proj"]


def soka_modules(model: nn.Module, config: SokaConfig, gen: torch.Generator
                 ) -> dict[str, dict[str, torch.Tensor]]:
    """Random SoKA terms with the factor shapes of tessera's rule."""
    def make(t: TargetInfo) -> dict[str, torch.Tensor]:
        f = kron_factors(t.out_features, t.in_features)
        r = config.rank_of(t.path)
        return {"soka_A": randn(gen, r, f.m, f.n, scale=0.4),
                "soka_B": randn(gen, r, f.p, f.q, scale=0.4)}
    return per_target(model, config.target_modules, make)


@factory("soka")
def make_soka(model: nn.Module, gen: torch.Generator) -> Adapter:
    rank = int(torch.randint(2, 6, (1,), generator=gen))
    config = SokaConfig(r=rank, scale=0.7, target_modules=TARGETS,
                        rank_pattern={"v_proj": rank + 2})
    return Adapter((Component("soka", config, soka_modules(model, config, gen)),))
