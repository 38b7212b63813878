"""Initial adapter tensors per method: identity at step 0 wherever the method allows.

Shapes and names always come from the registered method's ``schema``, so a trained adapter
has exactly the tensors the server validates.

| method | init | identity at step 0 |
|---|---|---|
| lora / rsLoRA | ``A`` kaiming-uniform (PEFT's ``a = sqrt(5)``), ``B = 0`` | yes |
| dora | LoRA's, and ``m = ||W0||_row`` (so ``g = 1``) | yes |
| hra | PEFT's: even ``r`` pairs identical columns (``H_{2i} H_{2i+1} = I``) | yes (even r) |
| hra + Gram-Schmidt | random columns (``R = I - 2 Q Q^T`` is never ``I``) | no |
| hut | ``M_A`` kaiming-uniform, ``M_B = 0``, ``gamma = 1``, ``beta = 0`` | yes |
| soka | KPSVD of W0, trained on the residual base ``W0 - init`` (PiSSA-like) | yes |
| bottleneck | ``D`` kaiming-uniform, ``U = 0``, biases 0, LayerNorm ``(1, 0)`` | yes |
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from tessera.adapters import registry
from tessera.adapters import targets as tg
from tessera.adapters.kpsvd import Rule, residual_weights, soka_init
from tessera.adapters.method import Component, MethodConfig
from tessera.adapters.methods.dora import MAGNITUDE
from tessera.adapters.methods.hra import HraConfig
from tessera.adapters.targets import TargetInfo

Tensors = dict[str, torch.Tensor]


def kaiming_uniform(shape: tuple[int, ...], fan_in: int, gen: torch.Generator) -> torch.Tensor:
    """``nn.init.kaiming_uniform_(w, a=sqrt(5))`` as PEFT uses it: U(-1/sqrt(fan_in), ...)."""
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


def _hra_u(config: HraConfig, target: TargetInfo, gen: torch.Generator) -> torch.Tensor:
    r, d = config.r, target.in_features
    if config.apply_GS or r % 2:
        return kaiming_uniform((d, r), r, gen)  # [in, r]
    half = kaiming_uniform((d, r // 2), r // 2, gen)  # [in, r/2]
    return torch.repeat_interleave(half, 2, dim=1)  # [in, r], columns 2i and 2i+1 equal


def module_tensors(method: str, config: MethodConfig, target: TargetInfo,
                   weight: torch.Tensor, gen: torch.Generator) -> Tensors:
    """Initial tensors of one module (``weight`` is W0 ``[out, in]``)."""
    shapes = registry.get(method).schema(config, target)
    out: Tensors = {name: torch.zeros(shape) for name, shape in shapes.items()}
    if method in ("lora", "dora"):
        a_shape = shapes["lora_A"]  # [r, in]
        out["lora_A"] = kaiming_uniform(a_shape, a_shape[1], gen)
        if method == "dora":
            out[MAGNITUDE] = weight.detach().float().norm(dim=1)  # [out]
    elif method == "hra":
        assert isinstance(config, HraConfig)
        out["hra_u"] = _hra_u(config, target, gen)
    elif method == "hut":
        out["hut_A"] = kaiming_uniform(shapes["hut_A"], shapes["hut_A"][1], gen)  # [out, r]
        out["hut_gamma"] = torch.ones(shapes["hut_gamma"])  # [in]
    elif method == "bottleneck":
        k, d = shapes["down_weight"]  # [k, out]
        out["down_weight"] = kaiming_uniform((k, d), d, gen)
        if "ln_weight" in out:
            out["ln_weight"] = torch.ones(shapes["ln_weight"])
    else:
        raise ValueError(f"method {method!r} has no random init here (soka: soka_start)")
    return out


def initial_tensors(method: str, config: MethodConfig, model: nn.Module,
                    gen: torch.Generator) -> dict[str, Tensors]:
    """Initial tensors for every module ``config.target_modules`` selects on ``model``."""
    available = tg.discover(model)
    paths = registry.get(method).target_paths(config, available)
    if not paths:
        raise ValueError(f"target_modules {getattr(config, 'target_modules', None)!r} select "
                         "no projection of the base model")
    return {path: module_tensors(method, config, available[path],
                                 tg.weight_of(tg.unwrap(model.get_submodule(path))), gen)
            for path in paths}


@dataclass(frozen=True)
class SokaStart:
    """A PiSSA-like SoKA run: the KPSVD init terms and the residual base they leave."""

    init: Component  # trained from here; exported as a delta against the original W0
    residual: Mapping[str, torch.Tensor]  # path -> W0 - s * sum A ⊗ B, [out, in]


def soka_start(model: nn.Module, target_modules: list[str] | str, *, rule: Rule,
               tau: float, fixed_rank: int, max_rank: int) -> SokaStart:
    """KPSVD terms of each targeted W0, rank per module by ``rule`` (``tessera.adapters.kpsvd``)."""
    adapter = soka_init(model, target_modules, rule=rule, tau=tau, fixed_rank=fixed_rank,
                        max_rank=max_rank)
    (init,) = adapter.components
    return SokaStart(init, residual_weights(model, init))


def install_residual(model: nn.Module, residual: Mapping[str, torch.Tensor]) -> None:
    """Overwrite the (private, frozen) training copy's W0 with ``W0 - init``."""
    available = tg.discover(model)
    with torch.no_grad():
        for path, weight in residual.items():
            module = tg.unwrap(model.get_submodule(path))
            param = module.weight
            assert isinstance(param, torch.Tensor)
            param.copy_(tg.to_module_layout(weight, available[path].kind).to(param.dtype))
