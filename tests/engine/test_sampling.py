"""Sampling is numerically safe for every value the schema admits: probabilities are
finite, sum to 1 and keep the most likely token; tiny temperatures are greedy; NaN logits
are the row's own error."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import RowError
from engine.sampling import (
    GREEDY_BELOW,
    NonFiniteLogitsError,
    Sampler,
    SamplingParams,
    filtered_probs,
)

V = 64


def logits_of(seed: int, scale: float = 10.0) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * scale  # [V]


@pytest.mark.parametrize("temperature", [1e-40, 5e-324, 1e-30, GREEDY_BELOW / 2])
def test_tiny_temperature_is_greedy(temperature: float) -> None:
    logits = logits_of(0)
    sampler = Sampler(SamplingParams(temperature=temperature, seed=1))
    assert sampler.params.greedy
    assert sampler.pick(logits) == int(torch.argmax(logits))


@pytest.mark.parametrize("top_p", [5e-324, 1e-45, 1e-300, 1e-9])
def test_top_p_that_keeps_nothing_keeps_the_top_token(top_p: float) -> None:
    logits = logits_of(1)
    probs = filtered_probs(logits, SamplingParams(top_p=top_p))  # [V]
    assert torch.isfinite(probs).all()
    assert int(torch.argmax(probs)) == int(torch.argmax(logits))
    assert float(probs.max()) == pytest.approx(1.0)
    sampler = Sampler(SamplingParams(top_p=top_p, seed=3))
    assert all(sampler.pick(logits) == int(torch.argmax(logits)) for _ in range(5))


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
def test_probs_are_finite_for_every_admitted_value(temperature: float, top_p: float,
                                                   top_k: int, seed: int,
                                                   scale: float) -> None:
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    logits = logits_of(seed, scale)
    if params.greedy:
        assert Sampler(params).pick(logits) == int(torch.argmax(logits))
        return
    probs = filtered_probs(logits, params)  # [V]
    assert torch.isfinite(probs).all()
    assert math.isclose(float(probs.sum()), 1.0, rel_tol=1e-4)
    assert float(probs[int(torch.argmax(logits))]) > 0.0  # the top token always survives
    token = Sampler(params).pick(logits)
    assert 0 <= token < V and float(probs[token]) > 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_non_finite_logits_are_the_rows_error(bad: float, temperature: float) -> None:
    logits = logits_of(4)
    logits[7] = bad
    with pytest.raises(NonFiniteLogitsError) as caught:
        Sampler(SamplingParams(temperature=temperature, seed=0)).pick(logits)
    assert isinstance(caught.value, RowError)


def test_negative_infinity_is_a_legitimate_logit() -> None:
    logits = logits_of(5)
    logits[:10] = float("-inf")
    probs = filtered_probs(logits, SamplingParams(temperature=0.5))
    assert torch.isfinite(probs).all() and float(probs[:10].sum()) == 0.0
