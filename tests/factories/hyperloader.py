"""A random HyperLoader hypernetwork per call, with one registered task; the factory returns
the task's generated adapter (LoRA on q/v + bottleneck adapters with LayerNorm).

The heads are drawn larger than the library's training init so the generated adapter
clearly changes the output (non-identity)."""

from __future__ import annotations

import torch
from torch import nn

from tessera.adapters import targets as tg
from tessera.adapters.hypernet import HyperNetwork
from tessera.adapters.method import Adapter
from tessera.adapters.methods.hyperloader import HYPERLOADER, default_config
from tests.factories import factory, randn


def make_hypernetwork(model: nn.Module, gen: torch.Generator, **overrides: object
                      ) -> HyperNetwork:
    targets = tg.discover(model)
    raw: dict[str, object] = {"task_dim": 6, "hidden_dim": 10, "projector_dim": 8,
                              "lora_rank": int(torch.randint(2, 5, (1,), generator=gen)),
                              "bottleneck_dim": int(torch.randint(3, 7, (1,), generator=gen)),
                              "bottleneck_activation": "gelu"}
    raw.update(overrides)
    config = default_config(targets, **raw)
    hypernet = HYPERLOADER.init(config, targets, gen, std=1.0)
    for name, tensor in hypernet.weights.items():  # non-trivial everywhere, but bounded
        if name.startswith("heads."):
            tensor.copy_(randn(gen, *tensor.shape, scale=0.1))
    return hypernet


@factory("hyperloader")
def make_hyperloader(model: nn.Module, gen: torch.Generator) -> Adapter:
    hypernet = make_hypernetwork(model, gen)
    hypernet.register_task("task-a", randn(gen, hypernet.config.task_dim, scale=1.0))
    return HYPERLOADER.generate(hypernet, "task-a", tg.discover(model))
