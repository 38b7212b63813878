"""Bottleneck adapter layers (Houlsby et al. 2019, Pfeiffer et al. 2020; HyperLoader's
adapters), an *output*-stage method.

On each targeted module (whose OUTPUT is adapted, e.g. ``o_proj``/``down_proj``, GPT-2's
``attn.c_proj``/``mlp.c_proj``), with ``h = W0 x + b`` the module's output ``[N, out]``::

    h <- h + LN(U act(D h + d) + u)          # LN optional

Tensors per module: ``down_weight`` D ``[k, out]``, ``down_bias`` d ``[k]``, ``up_weight``
U ``[out, k]``, ``up_bias`` u ``[out]`` and, with ``layer_norm``, ``ln_weight``/``ln_bias``
``[out]``. Activations are restricted to those with ``act(0) = 0`` (relu, exact gelu, silu,
tanh) so that the pool's zero padding of hidden units is an exact no-op. Non-linear, hence
not mergeable (``merge`` raises ``NotMergeableError`` from the base class); a merged hot
tenant keeps this part on its reference path. Mixed batch: the ``bottleneck`` bank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from tessera.adapters.banks.bottleneck import Activation, activation, slot_meta
from tessera.adapters.method import Method, MethodConfig, PositiveFraction, Rank, SlotData, Tensors
from tessera.adapters.registry import register
from tessera.adapters.targets import TargetInfo


class BottleneckConfig(MethodConfig):
    dim: Rank = Field(description="bottleneck width k")
    activation: Activation = "relu"
    layer_norm: bool = False
    layer_norm_eps: PositiveFraction = 1e-5
    target_modules: list[str] | str


class Bottleneck(Method[BottleneckConfig]):
    name = "bottleneck"
    config_type = BottleneckConfig
    stage = "output"
    banks = ("bottleneck",)
    rank_limit = "max_bottleneck_dim"

    def schema(self, config: BottleneckConfig, target: TargetInfo
               ) -> dict[str, tuple[int, ...]]:
        k, out = config.dim, target.out_features
        shapes: dict[str, tuple[int, ...]] = {
            "down_weight": (k, out), "down_bias": (k,),
            "up_weight": (out, k), "up_bias": (out,)}
        if config.layer_norm:
            shapes.update(ln_weight=(out,), ln_bias=(out,))
        return shapes

    def rank(self, config: BottleneckConfig, target: TargetInfo) -> int:
        return config.dim

    def reference_output(self, config: BottleneckConfig, tensors: Tensors,
                         target: TargetInfo, h: torch.Tensor) -> torch.Tensor:
        act = activation(config.activation)
        hidden = act(F.linear(h, tensors["down_weight"], tensors["down_bias"]))  # [N, k]
        z = F.linear(hidden, tensors["up_weight"], tensors["up_bias"])  # [N, out]
        if config.layer_norm:
            z = F.layer_norm(z, (target.out_features,), tensors["ln_weight"],
                             tensors["ln_bias"], config.layer_norm_eps)
        return h + z  # [N, out]

    def reference(self, config: BottleneckConfig, tensors: Tensors, target: TargetInfo,
                  weight: torch.Tensor, bias: torch.Tensor | None,
                  x: torch.Tensor) -> torch.Tensor:
        """The whole wrapped layer: base projection, then the adapter on its output."""
        return self.reference_output(config, tensors, target, F.linear(x, weight, bias))

    def lower(self, config: BottleneckConfig, tensors: Tensors, target: TargetInfo,
              weight: torch.Tensor) -> dict[str, SlotData]:
        data = {"down": tensors["down_weight"], "down_bias": tensors["down_bias"],
                "up": tensors["up_weight"], "up_bias": tensors["up_bias"]}
        if config.layer_norm:
            data.update(ln_weight=tensors["ln_weight"], ln_bias=tensors["ln_bias"])
        meta = slot_meta(config.activation, config.layer_norm, config.layer_norm_eps)
        return {"bottleneck": SlotData(data, meta)}


register(Bottleneck())
