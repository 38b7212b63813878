"""Shared assertions and runners for the adapter tests."""

from __future__ import annotations

import copy

import torch
from torch import nn

from tessera.adapters import PoolConfig, SlotPool
from tessera.adapters.ops import Choice
from tests.factories import FACTORIES
from tests.models import tiny_model


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rel: float,
                        what: str = "") -> None:
    """max |actual - expected| <= rel * max |expected| (tolerance relative to output scale)."""
    actual, expected = actual.float(), expected.float()
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max()
    assert err <= rel * scale, f"{what}: max abs diff {err:.3e} > {rel:g} x scale {scale:.3e}"


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits  # type: ignore[no-any-return]


@torch.no_grad()
def pool_logits(pool: SlotPool, model: nn.Module, ids: torch.Tensor,
                slots: list[int]) -> torch.Tensor:
    with pool.use(torch.tensor(slots)):
        return logits(model, ids)


def meta_twin(methods: list[str], gather_budget: int = 1 << 40, device: str = "meta",
              kernels: Choice = "torch"
              ) -> tuple[tuple[nn.Module, SlotPool], tuple[nn.Module, SlotPool]]:
    """``(cpu model, cpu pool), (twin model, twin pool)`` of the tiny Llama, the twin on
    ``device`` (its banks on ``kernels``), slot ``i`` holding the same adapter of method
    ``methods[i]`` in both (lowered and validated on the CPU, written to both). On
    PyTorch's ``meta`` device tensors have shapes and no values: any host read of one
    (``.item()``, ``.tolist()``, ``nonzero``, ``unique``) raises."""
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(11)
    config = PoolConfig(num_slots=len(methods), max_rank=8, gather_budget=gather_budget)
    cpu = SlotPool(model, config)
    meta_model = copy.deepcopy(model).to(device)
    meta = SlotPool(meta_model, config.model_copy(update={"kernels": kernels}))
    for slot, name in enumerate(methods):
        prepared = cpu.prepare(FACTORIES[name](model, gen))
        cpu.write(slot, prepared)
        meta.write(slot, prepared)
    return (model, cpu), (meta_model, meta)
