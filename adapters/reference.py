"""Plain-torch single-adapter model forward and merged weights: the yardsticks the pool's
batched path is tested against, and the source of merged copies for hot tenants.

Both work on a *copy* of the base model; the shared base is never modified.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from tessera.adapters import targets as tg
from tessera.adapters.method import Adapter, Tensors
from tessera.adapters.pool import Part, parts_by_module
from tessera.adapters.targets import TargetInfo


class ReferenceLayer(nn.Module):
    """One module with one adapter's parts applied by the methods' reference forwards."""

    def __init__(self, base: nn.Module, target: TargetInfo, parts: list[Part]) -> None:
        super().__init__()
        self.base = base
        self.target = target
        self.parts = parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.target.in_features)  # [N, in]
        weight, bias = tg.weight_of(self.base), tg.bias_of(self.base)
        weight_parts = [p for p in self.parts if p[0].stage == "weight"]
        if weight_parts:
            method, config, tensors = weight_parts[0]
            y = method.reference(config, _cast(tensors, weight), self.target, weight, bias, flat)
        else:
            y = F.linear(flat, weight, bias)  # [N, out]
        for method, config, tensors in self.parts:
            if method.stage == "output":
                y = method.reference_output(config, _cast(tensors, weight), self.target, y)
        return y.reshape(*x.shape[:-1], self.target.out_features)


def _cast(tensors: Tensors, like: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v.to(like.device, like.dtype) for k, v in tensors.items()}


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path), child, module)


def base_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the base model with any slot-pool wrappers removed."""
    copied = copy.deepcopy(model)
    for path in tg.discover(copied):
        module = copied.get_submodule(path)
        if tg.unwrap(module) is not module:
            _replace(copied, path, tg.unwrap(module))
    return copied


def reference_model(model: nn.Module, adapter: Adapter) -> nn.Module:
    """A deep copy of ``model`` computing ``adapter`` through the reference forwards."""
    copied = base_copy(model)
    available = tg.discover(copied)
    for path, parts in parts_by_module(adapter).items():
        _replace(copied, path, ReferenceLayer(copied.get_submodule(path), available[path], parts))
    return copied


def merged_weights(model: nn.Module, adapter: Adapter
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """New ``(weight, bias)`` per module for the adapter's weight-stage parts, in the
    module's own layout (``[in, out]`` for Conv1D). Output-stage parts are not included."""
    available = tg.discover(model)
    merged: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for path, parts in parts_by_module(adapter).items():
        module = tg.unwrap(model.get_submodule(path))
        weight, bias = tg.weight_of(module), tg.bias_of(module)
        for method, config, tensors in parts:
            if method.stage != "weight":
                continue
            new_w, new_b = method.merge(config, _cast(tensors, weight), available[path],
                                        weight.detach(), None if bias is None else bias.detach())
            merged[path] = (tg.to_module_layout(new_w, available[path].kind), new_b)
    return merged


def merged_model(model: nn.Module, adapter: Adapter) -> nn.Module:
    """A deep copy with merged weights; output-stage parts (not mergeable) still run
    through their reference forward. Raises ``NotMergeableError`` when a weight-stage part
    cannot be merged."""
    merged = merged_weights(model, adapter)
    copied = base_copy(model)
    available = tg.discover(copied)
    for path, (weight, bias) in merged.items():
        module = copied.get_submodule(path)
        current = module.weight
        assert isinstance(current, torch.Tensor)
        with torch.no_grad():
            current.copy_(weight)
            if bias is not None:  # e.g. HUT's shift folded into a bias the base lacked
                module.bias = nn.Parameter(bias.to(current.dtype).clone())
    for path, parts in parts_by_module(adapter).items():
        rest = [p for p in parts if p[0].stage == "output"]
        if rest:
            _replace(copied, path, ReferenceLayer(copied.get_submodule(path), available[path],
                                                  rest))
    return copied
