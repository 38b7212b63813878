"""Random, non-identity adapters per method for the test matrix and the benchmarks.

Each module in this package registers a factory with :func:`factory` under a method or
generator name; a factory returns a whole :class:`Adapter` (usually one component).
Importing the package imports them all, so adding a method adds one file here.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

import torch
from torch import nn

from tessera.adapters import targets as tg
from tessera.adapters.method import Adapter
from tessera.adapters.targets import TargetInfo

Factory = Callable[[nn.Module, torch.Generator], Adapter]
FACTORIES: dict[str, Factory] = {}


def factory(method: str) -> Callable[[Factory], Factory]:
    def wrap(fn: Factory) -> Factory:
        FACTORIES[method] = fn
        return fn
    return wrap


def randn(gen: torch.Generator, *shape: int, scale: float = 0.2) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def per_target(model: nn.Module, target_modules: list[str] | str,
               make: Callable[[TargetInfo], dict[str, torch.Tensor]]
               ) -> dict[str, dict[str, torch.Tensor]]:
    """``make(target)`` for every module of ``model`` that ``target_modules`` selects."""
    available = tg.discover(model)
    return {path: make(available[path]) for path in tg.resolve(target_modules, available)}


for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
