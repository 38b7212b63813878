from __future__ import annotations

import torch
from torch import nn

from tessera.adapters import targets as tg
from tessera.adapters.method import Adapter, Component
from tessera.adapters.methods.dora import DoraConfig
from tests.factories import factory, randn
from tests.factories.lora import lora_modules

TARGETS = ["q_proj", "v_proj", "down_proj", "c_attn", "c_fc"]


@factory("dora")
def make_dora(model: nn.Module, gen: torch.Generator) -> Adapter:
    """Random DoRA: LoRA factors plus a magnitude that is *not* the row norm of W0 + s B A
    (which PEFT's init gives), so the rescaling really changes the output."""
    rank = int(torch.randint(2, 6, (1,), generator=gen))
    config = DoraConfig(r=rank, lora_alpha=float(2 * rank), target_modules=TARGETS,
                        use_rslora=bool(torch.randint(0, 2, (1,), generator=gen)),
                        rank_pattern={"v_proj": rank + 1}, alpha_pattern={"q_proj": 3.0})
    available = tg.discover(model)
    modules = lora_modules(model, config, gen)
    for path, tensors in modules.items():
        w0 = tg.weight_of(tg.unwrap(model.get_submodule(path))).detach().float()  # [out, in]
        row_norm = torch.linalg.vector_norm(w0, dim=1)  # [out]
        jitter = 1.0 + randn(gen, available[path].out_features, scale=0.5).clamp(-0.8, 0.8)
        tensors["lora_magnitude_vector"] = row_norm * jitter  # [out]
    return Adapter((Component("dora", config, modules),))
