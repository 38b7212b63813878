"""Per-request sampling: greedy, or temperature / top-k / top-p with a per-request seeded
``torch.Generator`` (reproducible whatever else shares the batch).

Numerically safe for every value :class:`SamplingParams` admits: a temperature below
:data:`GREEDY_BELOW` is greedy (vLLM's ``_SAMPLING_EPS`` rule), logits are shifted by their
maximum before the temperature divides them (so nothing overflows to ``inf``), and top-p
always keeps the most likely token (a ``top_p`` that rounds to 0 in float32 keeps exactly
that one). Logits that are themselves NaN or ``+inf`` (a broken adapter, an overflowing
model) raise :class:`NonFiniteLogitsError`: that row fails, no other."""

from __future__ import annotations

import secrets

import torch
from pydantic import BaseModel, ConfigDict, Field

from engine.errors import RowError

GREEDY_BELOW = 1e-5  # temperatures below this are greedy: 1/T would overflow the logits


class NonFiniteLogitsError(RowError):
    """The model produced NaN or +inf logits for this row (its adapter, most likely)."""


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
        return self.temperature < GREEDY_BELOW or self.top_k == 1


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
            check_finite(logits)
            return int(torch.argmax(logits))
        probs = filtered_probs(logits.float().cpu(), self.params)  # [V]
        return int(torch.multinomial(probs, 1, generator=self.generator))


def check_finite(logits: torch.Tensor) -> None:
    """Raise :class:`NonFiniteLogitsError` when ``logits`` ``[V]`` hold NaN or ``+inf``
    (``-inf`` is a legitimate "never this token")."""
    if bool(torch.isnan(logits).any()) or bool(torch.isposinf(logits).any()):
        raise NonFiniteLogitsError("the model produced non-finite logits for this request "
                                   "(NaN or +inf); its adapter may be broken")


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) over ``logits`` ``[V]`` -> probs ``[V]``.
    The most likely token always survives the filters; the result is finite and sums to 1."""
    check_finite(logits)
    shifted = logits - logits.max()  # [V], <= 0 with a 0: dividing cannot reach +inf
    scaled = shifted / params.temperature  # [V]
    if 0 < params.top_k < scaled.shape[0]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)  # [V]; the top token has exp(0) = 1 before norm
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)  # [V], [V]
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass ranked above each
        drop = before >= params.top_p  # keep the smallest prefix reaching top_p
        drop[0] = False  # the top token stays even when top_p rounds to 0 in float32
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs = probs / probs.sum()
    return probs
