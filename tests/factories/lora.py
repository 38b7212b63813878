from __future__ import annotations

import torch
from torch import nn

from tessera.adapters.method import Adapter, Component
from tessera.adapters.methods.lora import LoraConfig
from tessera.adapters.targets import TargetInfo
from tests.factories import factory, per_target, randn

ATTENTION = ["q_proj", "v_proj", "c_attn"]


def lora_modules(model: nn.Module, config: LoraConfig, gen: torch.Generator
                 ) -> dict[str, dict[str, torch.Tensor]]:
    def make(t: TargetInfo) -> dict[str, torch.Tensor]:
        r = config.rank_of(t.path)
        return {"lora_A": randn(gen, r, t.in_features), "lora_B": randn(gen, t.out_features, r)}
    return per_target(model, config.target_modules, make)


@factory("lora")
def make_lora(model: nn.Module, gen: torch.Generator) -> Adapter:
    rank = int(torch.randint(2, 6, (1,), generator=gen))
    config = LoraConfig(r=rank, lora_alpha=float(2 * rank), target_modules=ATTENTION,
                        use_rslora=bool(torch.randint(0, 2, (1,), generator=gen)),
                        rank_pattern={"v_proj": rank + 1}, alpha_pattern={"q_proj": 3.0})
    return Adapter((Component("lora", config, lora_modules(model, config, gen)),))
