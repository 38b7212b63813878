"""Per-request sampling: greedy, or temperature / top-k / top-p with a per-request seeded
``torch.Generator`` (reproducible whatever else shares the batch)."""

from __future__ import annotations

import secrets

import torch
from pydantic import BaseModel, ConfigDict, Field


class SamplingParams(BaseModel):
    """How one request picks its tokens. ``temperature == 0`` is greedy (argmax)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int | None = Field(None, ge=1, description="None = the engine default")
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 = off")
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: tuple[str, ...] = Field((), description="stop sequences, matched on decoded text")
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


class Sampler:
    """One request's token picker; owns its generator (CPU, so results do not depend on
    the device or on the other rows of the batch)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator().manual_seed(seed)

    def pick(self, logits: torch.Tensor) -> int:
        """Next token from ``logits`` ``[V]`` (any dtype/device)."""
        if self.generator is None:
            return int(torch.argmax(logits))
        probs = filtered_probs(logits.float().cpu(), self.params)  # [V]
        return int(torch.multinomial(probs, 1, generator=self.generator))


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) over ``logits`` ``[V]`` -> probs ``[V]``.
    The most likely token always survives the filters."""
    scaled = logits / params.temperature  # [V]
    if 0 < params.top_k < scaled.shape[0]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)  # [V]
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)  # [V], [V]
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass ranked above each
        drop = before >= params.top_p  # keep the smallest prefix reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs = probs / probs.sum()
    return probs
