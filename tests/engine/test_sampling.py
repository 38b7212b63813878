"""Sampling: the batched device sampler equals the plain per-row reference (same uniform
draws), every admitted value is numerically safe (finite probabilities that keep the most
likely token; tiny temperatures are greedy), NaN logits are the row's own failure, and
log-probabilities equal an independent log-softmax."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.engine.sampling import (
    GREEDY_BELOW,
    NonFiniteLogitsError,
    Sampler,
    SamplingParams,
    filtered_probs,
    pick_batch,
    pick_reference,
)

V = 64


def logits_of(seed: int, scale: float = 10.0, rows: int | None = None) -> torch.Tensor:
    shape = (V,) if rows is None else (rows, V)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def replayed(params: SamplingParams) -> list[float]:
    """The uniforms a sampler with ``params`` will draw (its seeded stream, replayed)."""
    assert params.seed is not None
    gen = torch.Generator().manual_seed(params.seed)
    return [float(torch.rand((), generator=gen)) for _ in range(8)]


def pick_one(logits: torch.Tensor, params: SamplingParams) -> int:
    return pick_batch(logits.unsqueeze(0), [Sampler(params)]).tokens[0]


@pytest.mark.parametrize("temperature", [1e-40, 5e-324, 1e-30, GREEDY_BELOW / 2])
def test_tiny_temperature_is_greedy(temperature: float) -> None:
    logits = logits_of(0)
    params = SamplingParams(temperature=temperature, seed=1)
    assert params.greedy and Sampler(params).generator is None
    assert pick_one(logits, params) == int(torch.argmax(logits))


@pytest.mark.parametrize("top_p", [5e-324, 1e-45, 1e-300, 1e-9])
def test_top_p_that_keeps_nothing_keeps_the_top_token(top_p: float) -> None:
    logits = logits_of(1)
    probs = filtered_probs(logits, SamplingParams(top_p=top_p))  # [V]
    assert torch.isfinite(probs).all()
    assert int(torch.argmax(probs)) == int(torch.argmax(logits))
    assert float(probs.max()) == pytest.approx(1.0)
    sampler = Sampler(SamplingParams(top_p=top_p, seed=3))
    for _ in range(5):
        assert pick_batch(logits.unsqueeze(0), [sampler]).tokens[0] == int(logits.argmax())


def test_small_temperature_on_huge_logits_stays_finite() -> None:
    """1/T times logits of 1e4 would overflow without the shift by the maximum."""
    logits = logits_of(2, scale=1e4)
    probs = filtered_probs(logits, SamplingParams(temperature=GREEDY_BELOW))
    assert torch.isfinite(probs).all()
    assert int(torch.argmax(probs)) == int(torch.argmax(logits))


@settings(max_examples=200, deadline=None)
@given(temperature=st.floats(0.0, 100.0), top_p=st.floats(0.0, 1.0, exclude_min=True),
       top_k=st.integers(0, V + 4), seed=st.integers(0, 1000),
       scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4, 1e30]))
def test_every_admitted_value_is_safe_and_matches_the_reference(
        temperature: float, top_p: float, top_k: int, seed: int, scale: float) -> None:
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    logits = logits_of(seed, scale)
    token = pick_one(logits, params)
    if params.greedy:
        assert token == int(torch.argmax(logits))
        return
    probs = filtered_probs(logits, params)  # [V]
    assert torch.isfinite(probs).all()
    assert math.isclose(float(probs.sum()), 1.0, rel_tol=1e-4)
    assert float(probs[int(torch.argmax(logits))]) > 0.0  # the top token always survives
    assert float(probs[token]) > 0.0
    assert token == pick_reference(logits, params, replayed(params)[0])


def test_a_mixed_batch_equals_each_row_alone() -> None:
    """Greedy and sampled rows with different temperature / top-k / top-p in one batch:
    each row's tokens over several steps equal the per-row reference with its own
    uniform stream (the batch never changes a row's choice)."""
    rows = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, seed=11),
            SamplingParams(top_k=5, seed=12), SamplingParams(top_p=0.6, seed=13),
            SamplingParams(temperature=1.3, top_k=20, top_p=0.9, seed=14),
            SamplingParams(temperature=0.0, logprobs=3)]
    samplers = [Sampler(p) for p in rows]
    streams = [replayed(p) if p.seed is not None else [] for p in rows]
    for step in range(5):
        logits = logits_of(100 + step, rows=len(rows))  # [B, V]
        picked = pick_batch(logits, samplers)
        for i, params in enumerate(rows):
            u = streams[i][step] if streams[i] else 0.0
            assert picked.tokens[i] == pick_reference(logits[i], params, u), (step, i)


def test_logprobs_equal_an_independent_log_softmax() -> None:
    logits = logits_of(7, rows=3).double().float()  # [3, V]
    samplers = [Sampler(SamplingParams(temperature=0.0, logprobs=4)),
                Sampler(SamplingParams(seed=5, logprobs=2)),
                Sampler(SamplingParams(temperature=0.0))]
    picked = pick_batch(logits, samplers)
    reference = logits.double() - torch.logsumexp(logits.double(), dim=-1, keepdim=True)
    for i, token in enumerate(picked.tokens):
        assert picked.logprobs[i] == pytest.approx(float(reference[i, token]), abs=1e-4)
    assert [len(t) for t in picked.top] == [4, 2, 0]
    for i, top in enumerate(picked.top):
        order = torch.argsort(reference[i], descending=True)[:len(top)].tolist()
        assert [t for t, _ in top] == order
        for token, logprob in top:
            assert logprob == pytest.approx(float(reference[i, token]), abs=1e-4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_mark_only_their_row(bad: float) -> None:
    logits = logits_of(4, rows=3)  # [3, V]
    logits[1, 7] = bad
    samplers = [Sampler(SamplingParams(temperature=0.0)), Sampler(SamplingParams(seed=0)),
                Sampler(SamplingParams(seed=1))]
    picked = pick_batch(logits, samplers)
    assert picked.bad == [False, True, False]
    assert picked.tokens[0] == int(logits[0].argmax())
    assert math.isfinite(picked.logprobs[0]) and math.isfinite(picked.logprobs[2])
    with pytest.raises(NonFiniteLogitsError):
        pick_reference(logits[1], SamplingParams(seed=0), 0.5)


def test_negative_infinity_is_a_legitimate_logit() -> None:
    logits = logits_of(5)
    logits[:10] = float("-inf")
    probs = filtered_probs(logits, SamplingParams(temperature=0.5))
    assert torch.isfinite(probs).all() and float(probs[:10].sum()) == 0.0
    assert pick_one(logits, SamplingParams(temperature=0.5, seed=2)) >= 10
