"""Random non-identity bottleneck adapters on the attention output and MLP down projections.

The matrix draws two adapters per case and runs them in gather mode too: both use the same
activation and LayerNorm setting (gather needs them to agree); their widths differ, so the
zero padding of hidden units is exercised. Mixed activations are covered by
``tests/test_bottleneck.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from tessera.adapters.banks.bottleneck import Activation
from tessera.adapters.method import Adapter, Component
from tessera.adapters.methods.bottleneck import BottleneckConfig
from tessera.adapters.targets import TargetInfo
from tests.factories import factory, per_target, randn

OUTPUTS = ["o_proj", "down_proj", "attn.c_proj", "mlp.c_proj"]


def bottleneck_modules(model: nn.Module, config: BottleneckConfig, gen: torch.Generator
                       ) -> dict[str, dict[str, torch.Tensor]]:
    def make(t: TargetInfo) -> dict[str, torch.Tensor]:
        out, k = t.out_features, config.dim
        tensors = {"down_weight": randn(gen, k, out, scale=0.5), "down_bias": randn(gen, k),
                   "up_weight": randn(gen, out, k, scale=0.5), "up_bias": randn(gen, out)}
        if config.layer_norm:
            tensors["ln_weight"] = 1.0 + randn(gen, out)
            tensors["ln_bias"] = randn(gen, out)
        return tensors
    return per_target(model, config.target_modules, make)


def make_bottleneck_adapter(model: nn.Module, gen: torch.Generator, *, dim: int,
                            act: Activation = "gelu", layer_norm: bool = True,
                            eps: float = 1e-5) -> Adapter:
    config = BottleneckConfig(dim=dim, activation=act, layer_norm=layer_norm,
                              layer_norm_eps=eps, target_modules=OUTPUTS)
    return Adapter((Component("bottleneck", config, bottleneck_modules(model, config, gen)),))


@factory("bottleneck")
def make_bottleneck(model: nn.Module, gen: torch.Generator) -> Adapter:
    dim = int(torch.randint(2, 7, (1,), generator=gen))
    return make_bottleneck_adapter(model, gen, dim=dim)
