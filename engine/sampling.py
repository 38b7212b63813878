"""Sampling, batched on the device: greedy, or temperature / top-k / top-p with a
per-request seeded ``torch.Generator`` (reproducible whatever else shares the batch), the
logit adjustments of OpenAI and vLLM (``min_tokens``, ``logit_bias``, repetition, frequency
and presence penalties), and each chosen token's log-probability (plus the top-n
alternatives where asked) out of the same step.

:func:`pick_batch` takes the step's logits ``[B, V]`` and the rows' samplers and does
everything with batched tensor ops: the adjustments as per-row tensors (sparse
``(row, token)`` writes for ``min_tokens`` and ``logit_bias``; the penalised rows' token
counts ``[P, V]``, kept on the device by their samplers, for the penalties), one sort for
the rows that sample (none when every row is greedy), per-row temperature / top-k / top-p
as ``[S]`` tensors, inverse-CDF sampling with one uniform number per sampled row drawn from
that row's own CPU generator, and ONE host transfer per step for tokens,
log-probabilities and the failure flags. :func:`pick_reference` is the plain per-row
version beside it, one token at a time (tests assert they agree).

The adjustments run in vLLM's order, on the raw logits, before the temperature:
``min_tokens`` (the row's stop token ids -- the model's EOS ids unless ``ignore_eos`` --
are ``-inf`` while fewer tokens than that were generated), ``logit_bias`` (added), then the
repetition penalty (vLLM / HF: a logit of a token seen in the prompt or the output is
divided by it when positive, multiplied by it otherwise), the frequency penalty (times the
token's count in the output) and the presence penalty (once if it occurs in the output),
both subtracted as OpenAI defines them. Greedy rows take the argmax of the adjusted logits.

Numerically safe for every value :class:`SamplingParams` admits: a temperature below
:data:`GREEDY_BELOW` is greedy (vLLM's ``_SAMPLING_EPS`` rule), adjusted logits are
clamped below ``+inf``, logits are shifted by their maximum before the temperature divides
them (so nothing overflows to ``inf``), and top-p always keeps the most likely token (a
``top_p`` that rounds to 0 in float32 keeps exactly that one). Logits that are themselves
NaN or ``+inf`` (a broken adapter, an overflowing model), or that leave no token possible
(every logit ``-inf``), mark the row: it fails with :class:`NonFiniteLogitsError`, no
other row does. Log-probabilities are those of the model's own distribution (log-softmax
of the raw logits, before any adjustment), as vLLM (its default ``raw_logprobs``) and
OpenAI report them."""

from __future__ import annotations

import math
import secrets
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tessera.adapters.plan import on_device
from tessera.engine.errors import RequestValidationError, RowError

GREEDY_BELOW = 1e-5  # temperatures below this are greedy: 1/T would overflow the logits
MAX_LOGPROBS = 20  # top alternatives a request may ask for (OpenAI's limit)
MAX_LOGIT_BIAS = 300  # logit_bias entries a request may carry (bounded work per step)
LOGIT_BIAS_LIMIT = 100.0  # |bias| (OpenAI's range)
PENALTY_LIMIT = 2.0  # |presence_penalty|, |frequency_penalty| (OpenAI's range)
MAX_REPETITION_PENALTY = 10.0
_FLOAT_MAX = torch.finfo(torch.float32).max


class NonFiniteLogitsError(RowError):
    """The model produced NaN or +inf logits for this row (its adapter, most likely), or
    its adjustments left no token possible."""

    def __init__(self) -> None:
        super().__init__("the model produced non-finite logits for this request (NaN or "
                         "+inf, or no token left possible); its adapter may be broken")


TokenBias = tuple[Annotated[int, Field(ge=0)],
                  Annotated[float, Field(ge=-LOGIT_BIAS_LIMIT, le=LOGIT_BIAS_LIMIT,
                                         allow_inf_nan=False)]]


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
    presence_penalty: float = Field(0.0, ge=-PENALTY_LIMIT, le=PENALTY_LIMIT,
                                    allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-PENALTY_LIMIT, le=PENALTY_LIMIT,
                                     allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0.0, le=MAX_REPETITION_PENALTY,
                                      allow_inf_nan=False)
    logit_bias: tuple[TokenBias, ...] = Field((), max_length=MAX_LOGIT_BIAS, description=(
        "(token id, bias) pairs, each token once; the bias is added to its logit"))
    min_tokens: int = Field(0, ge=0, description="tokens generated before an EOS may be")

    @model_validator(mode="after")
    def _consistent(self) -> SamplingParams:
        tokens = [t for t, _ in self.logit_bias]
        if len(set(tokens)) != len(tokens):
            raise ValueError("logit_bias names a token more than once")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) exceeds max_tokens "
                             f"({self.max_tokens})")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    @property
    def penalised(self) -> bool:
        """Needs the row's token counts (any penalty away from its neutral value)."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)


class Sampler:
    """One request's token picker. Owns its generator (CPU, so results do not depend on
    the device or on the other rows of the batch) and the row's adjustment state: its
    prompt ids (repetition penalty), its stop token ids (``min_tokens``), how many tokens
    it generated, and -- for a penalised row, created on its first pick on the logits'
    device -- its output token counts ``[V]`` and the tokens seen in prompt or output
    ``[V]``. :func:`pick_batch` updates that state with every token it picks."""

    def __init__(self, params: SamplingParams, prompt: Sequence[int] = (),
                 stop_ids: Iterable[int] = (), vocab_size: int | None = None) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator().manual_seed(seed)
        if vocab_size is not None:
            outside = [t for t, _ in params.logit_bias if t >= vocab_size]
            if outside:
                raise RequestValidationError(f"logit_bias token id {outside[0]} is outside "
                                             f"the vocabulary [0, {vocab_size})")
        # the repetition penalty's prompt ids; min_tokens' stop ids (none when EOS is no stop)
        self.prompt = tuple(prompt) if params.repetition_penalty != 1.0 else ()
        self.stop_ids = (() if params.ignore_eos or not params.min_tokens
                         else tuple(sorted(set(stop_ids))))
        self.bias_ids = [t for t, _ in params.logit_bias]
        self.bias_values = [b for _, b in params.logit_bias]
        self.generated = 0  # tokens picked so far
        self.counts: torch.Tensor | None = None  # [V] int32, output token counts
        self.seen: torch.Tensor | None = None  # [V] bool, in the prompt or the output

    def uniform(self) -> float:
        """The next uniform number in [0, 1) of this request's own stream."""
        assert self.generator is not None
        return float(torch.rand((), generator=self.generator))

    @property
    def suppressing(self) -> bool:
        """Stop token ids are still forbidden (fewer than ``min_tokens`` generated)."""
        return bool(self.stop_ids) and self.generated < self.params.min_tokens

    def state(self, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The penalised row's ``(counts [V] int32, seen [V] bool)``, made on first use."""
        if self.counts is None or self.seen is None:
            self.counts = torch.zeros(vocab, dtype=torch.int32, device=device)
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            prompt = [t for t in self.prompt if 0 <= t < vocab]
            if prompt:
                self.seen[on_device(prompt, device)] = True
        return self.counts, self.seen


@dataclass(frozen=True)
class Picked:
    """One step's choices, per row."""

    tokens: list[int]
    logprobs: list[float]  # log p(token) under the model's raw distribution
    top: list[tuple[tuple[int, float], ...]]  # the row's top-n (token, logprob), n asked
    bad: list[bool]  # non-finite logits (or none possible): the row fails


@dataclass(frozen=True)
class _Penalised:
    """The penalised rows of a step: batch positions, their index ``[P]`` and their state
    stacked ``[P, V]`` (updated with the picked tokens, then handed back to the rows)."""

    rows: list[int]
    index: torch.Tensor
    counts: torch.Tensor
    seen: torch.Tensor


def pick_batch(logits: torch.Tensor, samplers: Sequence[Sampler]) -> Picked:
    """Next token of every row from ``logits`` ``[B, V]`` (any dtype/device).

    Full passes over ``[B, V]`` are what a step's picking costs (``V`` 32,000 x 32 rows:
    4 MB each), so the checks ride on one row maximum and the log-probabilities on one
    log-sum-exp, with no ``[B, V]`` copies: a row is bad when its maximum is NaN or
    ``+inf`` (NaN propagates through ``amax``), dead when it is ``-inf`` after the
    adjustments; bad and dead rows compute garbage that is never read (their rows fail),
    except the sampled ones, cleaned before sampling."""
    raw = logits.float()  # [B, V]; log-probabilities are the model's own
    vocab = raw.shape[1]
    peak = raw.amax(dim=-1)  # [B]
    x, penalised = _adjust(raw, samplers)  # [B, V]
    left = peak if x is raw else x.amax(dim=-1)  # [B]: -inf where nothing is left to pick
    bad = ~(peak < math.inf) | (left == -math.inf)  # [B]
    tokens = x.argmax(dim=-1)  # [B] greedy (first maximum)
    sampled = [i for i, s in enumerate(samplers) if s.generator is not None]
    if sampled:
        index = on_device(sampled, x.device)  # [S]
        params = [samplers[i].params for i in sampled]
        rows = x.index_select(0, index)  # [S, V]
        rows = rows.masked_fill(bad.index_select(0, index).unsqueeze(-1), 0.0)  # finite
        chosen = _sample(rows, params, [samplers[i].uniform() for i in sampled])  # [S]
        tokens = tokens.index_copy(0, index, chosen)
    if penalised is not None:
        _record(penalised, tokens, samplers)
    norm = torch.logsumexp(raw, dim=-1, keepdim=True)  # [B, 1]: log of the partition
    chosen_logp = raw.gather(1, tokens.unsqueeze(1)) - norm  # [B, 1]
    n = max((s.params.logprobs for s in samplers), default=0)
    columns = [tokens.unsqueeze(1).double(), chosen_logp.double(),
               bad.unsqueeze(1).double()]  # [B, 1] each
    if n:
        top_raw, top_ids = raw.topk(min(n, vocab), dim=-1)  # [B, n], [B, n]
        columns += [top_ids.double(), (top_raw - norm).double()]
    host = torch.cat(columns, dim=1).tolist()  # the step's one host transfer: [B, 3 + 2n]
    top: list[tuple[tuple[int, float], ...]] = []
    for row, sampler in zip(host, samplers, strict=True):
        sampler.generated += 1
        k = sampler.params.logprobs
        top.append(tuple((int(t), v) for t, v in zip(row[3:3 + k], row[3 + n:3 + n + k],
                                                      strict=True)))
    return Picked(tokens=[int(r[0]) for r in host], logprobs=[r[1] for r in host],
                  top=top, bad=[bool(r[2]) for r in host])


def _adjust(x: torch.Tensor, samplers: Sequence[Sampler]
            ) -> tuple[torch.Tensor, _Penalised | None]:
    """``min_tokens``, ``logit_bias`` and the penalties over ``x`` ``[B, V]`` (finite or
    ``-inf``), every row at once: ``x`` itself when no row adjusts anything, else a new
    tensor, clamped below ``+inf``; and the penalised rows' stacked state."""
    device, vocab = x.device, x.shape[1]
    banned: tuple[list[int], list[int]] = ([], [])  # (row, stop token) while suppressing
    biased: tuple[list[int], list[int], list[float]] = ([], [], [])  # (row, token, bias)
    for i, s in enumerate(samplers):
        if s.suppressing:
            banned[0].extend([i] * len(s.stop_ids))
            banned[1].extend(s.stop_ids)
        if s.bias_ids:
            biased[0].extend([i] * len(s.bias_ids))
            biased[1].extend(s.bias_ids)
            biased[2].extend(s.bias_values)
    rows = [i for i, s in enumerate(samplers) if s.params.penalised]
    if not (banned[0] or biased[0] or rows):
        return x, None
    if banned[0]:
        at = (on_device(banned[0], device), on_device(banned[1], device))
        x = x.index_put(at, on_device(float("-inf"), device))
    if biased[0]:
        at = (on_device(biased[0], device), on_device(biased[1], device))
        x = x.index_put(at, on_device(biased[2], device, x.dtype),
                        accumulate=True)
    penalised = None
    if rows:
        states = [samplers[i].state(vocab, device) for i in rows]
        index = on_device(rows, device)  # [P]
        counts = torch.stack([c for c, _ in states])  # [P, V] int32
        seen = torch.stack([m for _, m in states])  # [P, V] bool
        params = [samplers[i].params for i in rows]
        rep, freq, pres = (on_device([getattr(p, name) for p in params], device,
                                     x.dtype).unsqueeze(1)  # [P, 1]
                           for name in ("repetition_penalty", "frequency_penalty",
                                        "presence_penalty"))
        sub = x.index_select(0, index)  # [P, V]
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        sub = sub - freq * counts - pres * (counts > 0)
        x = x.index_copy(0, index, sub)
        penalised = _Penalised(rows, index, counts, seen)
    return x.clamp(max=_FLOAT_MAX), penalised


def _record(penalised: _Penalised, tokens: torch.Tensor, samplers: Sequence[Sampler]) -> None:
    """Count the picked ``tokens`` ``[B]`` in the penalised rows' state (on the device, no
    host sync) and hand each row its updated ``[V]`` slices."""
    chosen = tokens.index_select(0, penalised.index)  # [P]
    at = (torch.arange(len(penalised.rows), device=tokens.device), chosen)
    penalised.counts.index_put_(at, torch.ones((), dtype=torch.int32, device=tokens.device),
                                accumulate=True)
    penalised.seen.index_put_(at, torch.ones((), dtype=torch.bool, device=tokens.device))
    for i, counts, seen in zip(penalised.rows, penalised.counts.unbind(0),
                               penalised.seen.unbind(0), strict=True):
        samplers[i].counts, samplers[i].seen = counts, seen


def _sample(x: torch.Tensor, params: Sequence[SamplingParams],
            uniforms: Sequence[float]) -> torch.Tensor:
    """Temperature, top-k, top-p and inverse-CDF sampling of ``x`` ``[S, V]`` (finite
    logits) with one uniform per row -> token ids ``[S]``."""
    vocab = x.shape[1]
    device = x.device
    temperature = on_device([p.temperature for p in params], device)  # [S]
    top_k = on_device([p.top_k or vocab for p in params], device)  # [S]
    top_p = on_device([p.top_p for p in params], device)  # [S]
    u = on_device(uniforms, device)  # [S]
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


def adjusted_reference(logits: torch.Tensor, params: SamplingParams, *,
                       prompt: Sequence[int] = (), output: Sequence[int] = (),
                       stop_ids: Iterable[int] = ()) -> torch.Tensor:
    """The logits ``[V]`` a row picks from after ``min_tokens``, ``logit_bias`` and the
    penalties, one token at a time: ``prompt`` and ``output`` are the row's token ids so
    far, ``stop_ids`` the model's EOS ids. (Float32 arithmetic in :func:`pick_batch`'s
    order, so that both give the same numbers.)"""
    check_finite(logits)
    x = logits.float().clone()  # [V]
    if len(output) < params.min_tokens and not params.ignore_eos:
        for token in stop_ids:
            x[token] = float("-inf")
    for token, bias in params.logit_bias:
        x[token] = x[token] + torch.tensor(bias, dtype=torch.float32)
    rep, freq, pres = (torch.tensor(v, dtype=torch.float32) for v in (
        params.repetition_penalty, params.frequency_penalty, params.presence_penalty))
    if params.repetition_penalty != 1.0:
        for token in set(prompt) | set(output):
            x[token] = x[token] / rep if x[token] > 0 else x[token] * rep
    for token, count in Counter(output).items():
        x[token] = x[token] - freq * count - pres
    return x.clamp(max=_FLOAT_MAX)


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
    summing to 1 (the logits as given: adjust them first with :func:`adjusted_reference`)."""
    probs, order = _ranked(logits, params)
    return torch.zeros_like(probs).scatter_(0, order, probs / probs.sum())


def pick_reference(logits: torch.Tensor, params: SamplingParams, u: float, *,
                   prompt: Sequence[int] = (), output: Sequence[int] = (),
                   stop_ids: Iterable[int] = ()) -> int:
    """One row, plainly: its logits adjusted (:func:`adjusted_reference`), then greedy
    argmax, or the token where the kept mass's CDF (most likely first) passes ``u`` of it."""
    x = adjusted_reference(logits, params, prompt=prompt, output=output, stop_ids=stop_ids)
    if bool(torch.isneginf(x).all()):
        raise NonFiniteLogitsError()
    if params.greedy:
        return int(torch.argmax(x))
    probs, order = _ranked(x, params)  # [V], [V]
    cdf = torch.cumsum(probs, dim=-1)  # [V]
    target = torch.tensor([u], dtype=cdf.dtype) * cdf[-1]  # [1], as pick_batch rounds it
    at = int(torch.searchsorted(cdf, target, right=True))
    return int(order[min(at, probs.shape[0] - 1)])
