"""HyperLoader (arXiv 2407.01411) as a tessera *generator*: a hypernetwork that turns a
registered task into an ordinary :class:`~tessera.adapters.method.Adapter` = (LoRA on attention q
and v, bottleneck adapters with LayerNorm after the attention output projection and after
the MLP down projection), for every transformer layer.

The math, the config and the weight schema live in :mod:`tessera.adapters.hypernet`; this file
assembles generated tensors into method components (:func:`assemble`, which training also
runs, inside its autograd graph) and registers the generator. The result is generated once
per task (it depends only on (task, layer, position)), cached by the server like any
uploaded adapter and served by the pool through the ``lowrank`` and ``bottleneck`` banks.
Its LoRA part is mergeable; its bottleneck part is not.

Defaults target Llama/Qwen2/Mistral names; GPT-2 uses ``lora_targets=["c_attn"]``,
``fused_qkv=True``, ``bottleneck_targets=["attn.c_proj", "mlp.c_proj"]``
(see :func:`default_config`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tessera.adapters.hypernet import (
    HyperLoaderConfig,
    HyperNetwork,
    Site,
    base_schema,
    head_sizes,
    layout,
)
from tessera.adapters.method import Adapter, Component
from tessera.adapters.methods.bottleneck import BottleneckConfig
from tessera.adapters.methods.lora import LoraConfig
from tessera.adapters.registry import register_generator
from tessera.adapters.targets import TargetInfo

# Generated tensors per site: tensor kind -> tensor of the site's shape for that kind.
Generated = list[tuple[Site, dict[str, torch.Tensor]]]


def default_config(targets: Mapping[str, TargetInfo], **overrides: Any) -> HyperLoaderConfig:
    """A config for the base the targets come from (fused qkv detected from ``c_attn``)."""
    layers = {t.layer_index for t in targets.values() if t.layer_index is not None}
    fused = any(t.name == "c_attn" for t in targets.values())
    raw: dict[str, Any] = {
        "task_dim": 16, "hidden_dim": 32, "projector_dim": 16, "num_layers": len(layers),
        "lora_rank": 4, "lora_alpha": 8.0, "bottleneck_dim": 16,
        "lora_targets": ["c_attn"] if fused else ["q_proj", "v_proj"], "fused_qkv": fused,
        "bottleneck_targets": (["attn.c_proj", "mlp.c_proj"] if fused
                               else ["o_proj", "down_proj"])}
    raw.update(overrides)
    return HyperLoaderConfig.model_validate(raw)


def lora_component(config: HyperLoaderConfig, generated: Generated) -> Component:
    """The ``lora`` component of the generated tensors: one LoRA per ``lora_targets``
    module (rank ``lora_rank``), or, under ``fused_qkv``, one rank-2r LoRA per fused
    ``[q; k; v]`` module. Autograd-transparent: training assembles its generated tensors
    here too, so gradients reach the hypernetwork."""
    r, alpha = config.lora_rank, config.lora_alpha
    modules: dict[str, dict[str, torch.Tensor]] = {}
    if not config.fused_qkv:
        for site, tensors in generated:
            if site.position.group == "lora":
                modules[site.target.path] = {"lora_A": tensors["lora_A"],  # [r, in]
                                             "lora_B": tensors["lora_B"]}  # [out, r]
        lora_config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(modules))
        return Component("lora", lora_config, modules)
    # Fused [q; k; v]: one rank-2r LoRA, A = [A_q; A_v], B block-diagonal on the q and v
    # thirds. Doubling alpha with r keeps s = alpha / r exact (both scaled by 2).
    for site, tensors in generated:
        if site.position.group != "lora":
            continue
        t, block = site.target, site.target.out_features // 3
        entry = modules.setdefault(t.path, {
            "lora_A": torch.zeros(2 * r, t.in_features),   # [2r, in]
            "lora_B": torch.zeros(t.out_features, 2 * r)})  # [3 * block, 2r], k rows zero
        assert site.position.block is not None
        half = 0 if site.position.block == 0 else 1  # q -> first r, v -> second r
        cols = slice(half * r, (half + 1) * r)
        rows = slice(site.position.block * block, (site.position.block + 1) * block)
        entry["lora_A"][cols] = tensors["lora_A"]  # [r, in] -> rows `cols` of [2r, in]
        entry["lora_B"][rows, cols] = tensors["lora_B"]  # [block, r] -> one diagonal block
    lora_config = LoraConfig(r=2 * r, lora_alpha=2 * alpha, target_modules=list(modules))
    return Component("lora", lora_config, modules)


def bottleneck_component(config: HyperLoaderConfig, generated: Generated) -> Component:
    """The ``bottleneck`` component of the generated tensors: one bottleneck adapter with
    LayerNorm per ``bottleneck_targets`` module, its tensors as generated (``down_weight``
    ``[k, d]``, ``down_bias`` ``[k]``, ``up_weight`` ``[d, k]``, ``up_bias``/``ln_weight``/
    ``ln_bias`` ``[d]``)."""
    modules = {site.target.path: dict(tensors) for site, tensors in generated
               if site.position.group == "bottleneck"}
    bottleneck_config = BottleneckConfig(
        dim=config.bottleneck_dim, activation=config.bottleneck_activation, layer_norm=True,
        layer_norm_eps=config.layer_norm_eps, target_modules=list(modules))
    return Component("bottleneck", bottleneck_config, modules)


def assemble(config: HyperLoaderConfig, generated: Generated) -> Adapter:
    """Generated tensors per site (:meth:`HyperNetwork.generate_tensors`, or
    :func:`tessera.adapters.hypernet.generate_batched` zipped with its sites) as the
    adapter the server serves: (LoRA component, bottleneck component)."""
    return Adapter((lora_component(config, generated),
                    bottleneck_component(config, generated)))


class HyperLoader:
    """The registered generator; stateless (the hypernetwork is data)."""

    name = "hyperloader"
    config_type = HyperLoaderConfig

    def parse_config(self, raw: Mapping[str, Any]) -> HyperLoaderConfig:
        """Strict validation (pydantic raises naming the field)."""
        return HyperLoaderConfig.model_validate(dict(raw))

    def build(self, config: HyperLoaderConfig, weights: Mapping[str, torch.Tensor],
              tasks: Mapping[str, torch.Tensor] | None = None) -> HyperNetwork:
        """A hypernetwork from a state dict (checked without a base; bind with ``sites``)."""
        hypernet = HyperNetwork(config, dict(weights))
        hypernet.check_weights()
        for name, embedding in (tasks or {}).items():
            hypernet.register_task(name, embedding)
        return hypernet

    def init(self, config: HyperLoaderConfig, targets: Mapping[str, TargetInfo],
             generator: torch.Generator | None = None, *, std: float = 0.02) -> HyperNetwork:
        """Random weights for ``config`` on this base (a training start, or for benchmarks):
        normal(0, std) everywhere except the projector LayerNorm (weight 1, bias 0)."""
        shapes = base_schema(config)
        for kind, size in head_sizes(layout(config, targets)).items():
            shapes[f"heads.{kind}.weight"] = (size, config.projector_dim)
            shapes[f"heads.{kind}.bias"] = (size,)
        weights = {name: torch.randn(shape, generator=generator) * std
                   for name, shape in shapes.items()}
        weights["projector.norm.weight"] = torch.ones(config.projector_dim)
        weights["projector.norm.bias"] = torch.zeros(config.projector_dim)
        return self.build(config, weights)

    def generate(self, hypernet: HyperNetwork, task: str,
                 targets: Mapping[str, TargetInfo], *, reference: bool = False) -> Adapter:
        """The task's adapter: (LoRA component, bottleneck component), fp32 tensors."""
        generated = hypernet.generate_tensors(task, targets, reference=reference)
        return assemble(hypernet.config, generated)


HYPERLOADER = HyperLoader()
register_generator(HYPERLOADER)
