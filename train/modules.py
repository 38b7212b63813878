"""Trainable layers that compute with the server's own method code.

A training model is a private copy of the frozen base whose targeted projections are
replaced by :class:`TrainLayer` — a :class:`tessera.adapters.reference.ReferenceLayer`,
i.e. the very forward the server's reference path runs (``method.reference`` for the
weight stage, ``method.reference_output`` for the output stage). Its adapter tensors are
``nn.Parameter`` objects (:class:`TrainableAdapter`) or, for a HyperLoader, tensors the
hypernetwork generates inside the autograd graph; either way the layer sees an ordinary
:class:`~tessera.adapters.method.Adapter`, so one definition of each method's maths serves
training, export and serving.

The forward values are the serving values; gradients are autograd's through that forward.
One consequence: DoRA's row norm ``||W0 + s B A||_row`` is differentiated through, where
PEFT detaches it to save memory (the DoRA paper's suggestion); the function is the same,
the gradient the exact one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from tessera.adapters import targets as tg
from tessera.adapters.method import Adapter, Component, MethodConfig
from tessera.adapters.pool import Part, parts_by_module
from tessera.adapters.reference import ReferenceLayer, base_copy
from tessera.adapters.targets import TargetInfo


class TrainLayer(ReferenceLayer):
    """A reference layer whose parts are swapped by :func:`set_adapter` (no parts: base)."""

    def __init__(self, base: nn.Module, target: TargetInfo) -> None:
        super().__init__(base, target, [])

    def set_parts(self, parts: list[Part]) -> None:
        self.parts = parts


def training_copy(base: nn.Module, paths: Iterable[str]) -> nn.Module:
    """A frozen deep copy of ``base`` with :class:`TrainLayer` on each of ``paths``."""
    model = base_copy(base)
    model.requires_grad_(False)
    model.eval()  # no dropout: the frozen base computes as it serves
    available = tg.discover(model)
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, child, TrainLayer(getattr(parent, child), available[path]))
    return model


def train_layers(model: nn.Module) -> dict[str, TrainLayer]:
    return {path: m for path, m in model.named_modules() if isinstance(m, TrainLayer)}


def set_adapter(model: nn.Module, adapter: Adapter | None) -> None:
    """Route every :class:`TrainLayer` through ``adapter``'s parts (``None``: the base)."""
    grouped = parts_by_module(adapter) if adapter is not None else {}
    layers = train_layers(model)
    missing = sorted(set(grouped) - set(layers))
    if missing:
        raise ValueError(f"the adapter covers modules the training copy does not wrap: "
                         f"{missing[:3]}")
    for path, layer in layers.items():
        layer.set_parts(grouped.get(path, []))


def _key(path: str) -> str:
    return path.replace(".", "/")  # nn.ModuleDict keys may not contain dots


class TrainableAdapter(nn.Module):
    """An adapter's tensors as parameters: one ``ParameterDict`` per (component, module)."""

    def __init__(self, components: list[tuple[str, MethodConfig,
                                              Mapping[str, Mapping[str, torch.Tensor]]]]
                 ) -> None:
        super().__init__()
        self.specs = [(method, config) for method, config, _ in components]
        self.paths = [list(modules) for _, _, modules in components]
        self.tensors = nn.ModuleList(
            nn.ModuleDict({_key(path): nn.ParameterDict(
                {name: nn.Parameter(t.detach().clone().float()) for name, t in named.items()})
                for path, named in modules.items()})
            for _, _, modules in components)

    def _dicts(self, index: int) -> dict[str, nn.ParameterDict]:
        modules = self.tensors[index]
        assert isinstance(modules, nn.ModuleDict)
        out = {}
        for path in self.paths[index]:
            params = modules[_key(path)]
            assert isinstance(params, nn.ParameterDict)
            out[path] = params
        return out

    def adapter(self) -> Adapter:
        """The live adapter: its tensors ARE the parameters (gradients reach them)."""
        return Adapter(tuple(
            Component(method, config, {path: dict(params.items())
                                       for path, params in self._dicts(i).items()})
            for i, (method, config) in enumerate(self.specs)))

    def frozen(self) -> Adapter:
        """A detached fp32 copy, for export and evaluation."""
        return Adapter(tuple(
            Component(method, config, {path: {n: p.detach().clone() for n, p in params.items()}
                                       for path, params in self._dicts(i).items()})
            for i, (method, config) in enumerate(self.specs)))

    def named_tensors(self) -> dict[str, nn.Parameter]:
        """Stable flat names -> parameters (checkpoints, the optimizer)."""
        out = {}
        for i in range(len(self.specs)):
            for path, params in self._dicts(i).items():
                for name, p in params.items():
                    assert isinstance(p, nn.Parameter)
                    out[f"{i}.{path}.{name}"] = p
        return out
