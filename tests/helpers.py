"""Shared assertions and runners for the adapter tests."""

from __future__ import annotations

import torch
from torch import nn

from tessera.adapters import SlotPool


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
