"""Which modules of a Hugging Face causal LM adapters can attach to, and how to read them.

A *target* is a linear projection inside the decoder blocks: ``nn.Linear`` (Llama, Qwen2,
Mistral) or ``transformers``' ``Conv1D`` (GPT-2, weight stored ``[in, out]``). Module paths
are the names ``model.named_modules()`` gives on the causal-LM object, which is also what
PEFT writes after its ``base_model.model.`` prefix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

ModuleKind = Literal["linear", "conv1d"]
T = TypeVar("T")
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class TargetInfo:
    """Static description of one adaptable projection ``y = W0 x + b``."""

    path: str  # "model.layers.0.self_attn.q_proj"
    in_features: int
    out_features: int
    kind: ModuleKind
    has_bias: bool

    @property
    def name(self) -> str:
        """Last path component ("q_proj"), what ``target_modules`` usually names."""
        return self.path.rsplit(".", 1)[-1]

    @property
    def layer_index(self) -> int | None:
        found = _LAYER_INDEX.search(f".{self.path}.")
        return int(found.group(1)) if found else None


def describe(path: str, module: nn.Module) -> TargetInfo:
    """TargetInfo for a Linear or Conv1D module; anything else is not adaptable."""
    if isinstance(module, nn.Linear):
        return TargetInfo(path, module.in_features, module.out_features, "linear",
                          module.bias is not None)
    if isinstance(module, Conv1D):
        in_f, out_f = module.weight.shape  # Conv1D stores [in, out]
        return TargetInfo(path, int(in_f), int(out_f), "conv1d", module.bias is not None)
    raise TypeError(f"{path}: {type(module).__name__} is not a Linear or Conv1D projection")


def discover(model: nn.Module) -> dict[str, TargetInfo]:
    """Every adaptable projection of ``model`` by path, excluding the output embeddings."""
    get_out = getattr(model, "get_output_embeddings", None)
    lm_head = get_out() if callable(get_out) else None
    found: dict[str, TargetInfo] = {}
    wrapped: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(f"{w}.") for w in wrapped):
            continue  # the base layer inside a wrapper: reported under the wrapper's path
        wrapped_target = getattr(module, "target", None)
        if isinstance(wrapped_target, TargetInfo):  # an tessera.adapters.layer.AdapterLayer
            found[path] = wrapped_target
            wrapped.append(path)
        elif module is not lm_head and isinstance(module, (nn.Linear, Conv1D)):
            found[path] = describe(path, module)
    return found


def unwrap(module: nn.Module) -> nn.Module:
    """The base projection inside an ``AdapterLayer`` (or the module itself)."""
    if isinstance(getattr(module, "target", None), TargetInfo):
        base = module.base
        assert isinstance(base, nn.Module)
        return base
    return module


def weight_of(module: nn.Module) -> torch.Tensor:
    """W0 as ``[out, in]`` (a view for Conv1D, no copy)."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight.t() if isinstance(module, Conv1D) else weight


def bias_of(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def to_module_layout(weight: torch.Tensor, kind: ModuleKind) -> torch.Tensor:
    """Turn an ``[out, in]`` weight back into the layout the module stores."""
    return weight.t().contiguous() if kind == "conv1d" else weight


def matches(spec: str | Iterable[str], path: str) -> bool:
    """PEFT's ``target_modules`` rule: a string is a full-match regex over the module path;
    a list matches a path equal to an entry or ending in ``.<entry>``."""
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == key or path.endswith(f".{key}") for key in spec)


def resolve(spec: str | Iterable[str], available: Mapping[str, TargetInfo]) -> list[str]:
    """Paths in ``available`` that ``spec`` selects, in model order."""
    keys = spec if isinstance(spec, str) else list(spec)
    return [path for path in available if matches(keys, path)]


def pattern_value(patterns: Mapping[str, T], path: str, default: T) -> T:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key that matches the end
    of the module path (as a regex over whole dot-separated components) wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default
