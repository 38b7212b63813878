"""Sampling, batched on the device: greedy, or temperature / top-k / top-p with a
per-request seeded ``torch.Generator`` (reproducible whatever else shares the batch), and
each chosen token's log-probability (plus the top-n alternatives where asked) out of the
same step.

:func:`pick_batch` takes the step's logits ``[B, V]`` and the rows' samplers and does
everything with batched tensor ops: one sort for the rows that sample (none when every row
is greedy), per-row temperature / top-k / top-p as ``[S]`` tensors, inverse-CDF sampling
with one uniform number per sampled row drawn from that row's own CPU generator, and ONE
host transfer per step for tokens, log-probabilities and the non-finite flags.
:func:`pick_reference` is the plain per-row version beside it (tests assert they agree).

Numerically safe for every value :class:`SamplingParams` admits: a temperature below
:data:`GREEDY_BELOW` is greedy (vLLM's ``_SAMPLING_EPS`` rule), logits are shifted by their
maximum before the temperature divides them (so nothing overflows to ``inf``), and top-p
always keeps the most likely token (a ``top_p`` that rounds to 0 in float32 keeps exactly
that one). Logits that are themselves NaN or ``+inf`` (a broken adapter, an overflowing
model) mark the row: it fails with :class:`NonFiniteLogitsError`, no other row does.
Log-probabilities are those of the model's own distribution (log-softmax of the raw
logits), as vLLM and OpenAI report them."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from tessera.engine.errors import RowError

GREEDY_BELOW = 1e-5  # temperatures below this are greedy: 1/T would overflow the logits
MAX_LOGPROBS = 20  # top alternatives a request may ask for (OpenAI's limit)


class NonFiniteLogitsError(RowError):
    """The model produced NaN or +inf logits for this row (its adapter, most likely)."""

    def __init__(self) -> None:
        super().__init__("the model produced non-finite logits for this request (NaN or "
                         "+inf); its adapter may be broken")


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
    logprobs: int = Field(0, ge=0, le=MAX_LOGPROBS,
                          description="top alternatives reported with each token (0 = none; "
                                      "the chosen token's logprob is always reported)")

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

    def uniform(self) -> float:
        """The next uniform number in [0, 1) of this request's own stream."""
        assert self.generator is not None
        return float(torch.rand((), generator=self.generator))


@dataclass(frozen=True)
class Picked:
    """One step's choices, per row."""

    tokens: list[int]
    logprobs: list[float]  # log p(token) under the model's raw distribution
    top: list[tuple[tuple[int, float], ...]]  # the row's top-n (token, logprob), n asked
    bad: list[bool]  # non-finite logits: the row fails (its token is meaningless)


def pick_batch(logits: torch.Tensor, samplers: Sequence[Sampler]) -> Picked:
    """Next token of every row from ``logits`` ``[B, V]`` (any dtype/device)."""
    x = logits.float()  # [B, V]
    vocab = x.shape[1]
    bad = (torch.isnan(x) | torch.isposinf(x)).any(dim=-1)  # [B]
    x = x.masked_fill(bad.unsqueeze(-1), 0.0)  # a bad row's math stays finite; discarded
    tokens = x.argmax(dim=-1)  # [B] greedy (first maximum)
    sampled = [i for i, s in enumerate(samplers) if s.generator is not None]
    if sampled:
        index = torch.tensor(sampled, device=x.device)  # [S]
        params = [samplers[i].params for i in sampled]
        chosen = _sample(x.index_select(0, index), params,
                         [samplers[i].uniform() for i in sampled])  # [S]
        tokens = tokens.index_copy(0, index, chosen)
    logp = torch.log_softmax(x, dim=-1)  # [B, V]
    chosen_logp = logp.gather(1, tokens.unsqueeze(1))  # [B, 1]
    n = max((s.params.logprobs for s in samplers), default=0)
    columns = [tokens.unsqueeze(1).double(), chosen_logp.double(),
               bad.unsqueeze(1).double()]  # [B, 1] each
    if n:
        top_logp, top_ids = logp.topk(min(n, vocab), dim=-1)  # [B, n], [B, n]
        columns += [top_ids.double(), top_logp.double()]
    host = torch.cat(columns, dim=1).tolist()  # the step's one host transfer: [B, 3 + 2n]
    top: list[tuple[tuple[int, float], ...]] = []
    for row, sampler in zip(host, samplers, strict=True):
        k = sampler.params.logprobs
        top.append(tuple((int(t), v) for t, v in zip(row[3:3 + k], row[3 + n:3 + n + k],
                                                      strict=True)))
    return Picked(tokens=[int(r[0]) for r in host], logprobs=[r[1] for r in host],
                  top=top, bad=[bool(r[2]) for r in host])


def _sample(x: torch.Tensor, params: Sequence[SamplingParams],
            uniforms: Sequence[float]) -> torch.Tensor:
    """Temperature, top-k, top-p and inverse-CDF sampling of ``x`` ``[S, V]`` (finite
    logits) with one uniform per row -> token ids ``[S]``."""
    vocab = x.shape[1]
    device = x.device
    temperature = torch.tensor([p.temperature for p in params], device=device)  # [S]
    top_k = torch.tensor([p.top_k or vocab for p in params], device=device)  # [S]
    top_p = torch.tensor([p.top_p for p in params], device=device)  # [S]
    u = torch.tensor(uniforms, device=device)  # [S]
    shifted = x - x.max(dim=-1, keepdim=True).values  # [S, V], <= 0: no overflow below
    scaled = shifted / temperature.unsqueeze(1)  # [S, V]
    ranked, order = torch.sort(scaled, dim=-1, descending=True, stable=True)  # [S, V] x2
    rank = torch.arange(vocab, device=device).unsqueeze(0)  # [1, V]
    ranked = ranked.masked_fill(rank >= top_k.unsqueeze(1), float("-inf"))  # top-k
    probs = torch.softmax(ranked, dim=-1)  # [S, V], most likely first
    before = torch.cumsum(probs, dim=-1) - probs  # mass ranked above each token
    drop = before >= top_p.unsqueeze(1)  # top-p: the smallest prefix reaching it
    drop[:, 0] = False  # the top token stays even when top_p rounds to 0 in float32
    cdf = torch.cumsum(probs.masked_fill(drop, 0.0), dim=-1)  # [S, V]
    target = (u * cdf[:, -1]).unsqueeze(1)  # [S, 1]: u of the kept mass
    choice = torch.searchsorted(cdf, target, right=True).clamp_(max=vocab - 1)  # [S, 1]
    return order.gather(1, choice).squeeze(1)  # [S]


# --- the plain per-row reference ---------------------------------------------------------
def check_finite(logits: torch.Tensor) -> None:
    """Raise :class:`NonFiniteLogitsError` when ``logits`` ``[V]`` hold NaN or ``+inf``
    (``-inf`` is a legitimate "never this token")."""
    if bool(torch.isnan(logits).any()) or bool(torch.isposinf(logits).any()):
        raise NonFiniteLogitsError()


def _ranked(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, then top-k, then top-p (nucleus) over ``logits`` ``[V]``: the kept
    probability mass ``[V]`` (not renormalised) most likely first, and the token ids in that
    order ``[V]``. Top-k keeps exactly k tokens (ties broken by token id); the most likely
    token always survives."""
    check_finite(logits)
    shifted = logits.float() - logits.float().max()  # [V], <= 0 with a 0
    scaled = shifted / params.temperature  # [V]
    ranked, order = torch.sort(scaled, descending=True, stable=True)  # [V], [V]
    if 0 < params.top_k < scaled.shape[0]:
        ranked[params.top_k:] = float("-inf")
    probs = torch.softmax(ranked, dim=-1)  # [V], most likely first
    if params.top_p < 1.0:
        before = torch.cumsum(probs, dim=-1) - probs  # mass ranked above each
        drop = before >= params.top_p  # keep the smallest prefix reaching top_p
        drop[0] = False  # the top token stays even when top_p rounds to 0 in float32
        probs = probs.masked_fill(drop, 0.0)
    return probs, order


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled row draws from: probs ``[V]`` by token id, finite,
    summing to 1."""
    probs, order = _ranked(logits, params)
    return torch.zeros_like(probs).scatter_(0, order, probs / probs.sum())


def pick_reference(logits: torch.Tensor, params: SamplingParams, u: float) -> int:
    """One row, plainly: greedy argmax, or the token where the kept mass's CDF (most likely
    first) passes ``u`` of it."""
    check_finite(logits)
    if params.greedy:
        return int(torch.argmax(logits.float()))
    probs, order = _ranked(logits, params)  # [V], [V]
    cdf = torch.cumsum(probs, dim=-1)  # [V]
    target = torch.tensor([u], dtype=cdf.dtype) * cdf[-1]  # [1], as pick_batch rounds it
    at = int(torch.searchsorted(cdf, target, right=True))
    return int(order[min(at, probs.shape[0] - 1)])
