"""Sampling: the batched device sampler equals the plain per-row reference (same uniform
draws), every admitted value is numerically safe (finite probabilities that keep the most
likely token; tiny temperatures are greedy), NaN logits are the row's own failure, and
log-probabilities equal an independent log-softmax. The adjustments (min_tokens,
logit_bias, repetition / frequency / presence penalties) equal the per-token reference
over several steps, mean what OpenAI and vLLM say, and never touch another row."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.engine.errors import RequestValidationError
from tessera.engine.sampling import (
    GREEDY_BELOW,
    MAX_LOGIT_BIAS,
    NonFiniteLogitsError,
    Sampler,
    SamplingParams,
    adjusted_reference,
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


# --- min_tokens, logit_bias and the penalties ---------------------------------------------
EOS = (3, 9)  # the stop ids the tests' "model" has


def adjusted_params() -> st.SearchStrategy[SamplingParams]:
    """Sampling values with adjustments: every admitted range, neutral values included."""
    bias = st.lists(st.tuples(st.integers(0, V - 1), st.floats(-100.0, 100.0)),
                    max_size=6, unique_by=lambda entry: entry[0])
    return st.builds(
        SamplingParams,
        temperature=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
        top_p=st.sampled_from([1.0, 0.9, 0.3]), top_k=st.sampled_from([0, 1, 5]),
        seed=st.integers(0, 1000),
        presence_penalty=st.sampled_from([0.0, -2.0, -0.5, 0.7, 2.0]),
        frequency_penalty=st.sampled_from([0.0, -2.0, -0.3, 1.1, 2.0]),
        repetition_penalty=st.sampled_from([1.0, 1e-3, 0.5, 1.3, 2.0, 10.0]),
        logit_bias=bias.map(tuple), min_tokens=st.integers(0, 6),
        ignore_eos=st.booleans())


def run_reference(params: SamplingParams, prompt: list[int], steps: list[torch.Tensor]
                  ) -> list[int]:
    """The row's tokens over ``steps`` (one logits row ``[V]`` each), plainly."""
    uniforms = replayed(params) if params.seed is not None else [0.0] * len(steps)
    output: list[int] = []
    for step, logits in enumerate(steps):
        output.append(pick_reference(logits, params, uniforms[step], prompt=prompt,
                                     output=output, stop_ids=EOS))
    return output


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(adjusted_params(), min_size=1, max_size=5), seed=st.integers(0, 10**6),
       scale=st.sampled_from([1e-3, 1.0, 10.0, 1e4, 1e30]))
def test_adjusted_rows_match_the_reference_over_several_steps(
        rows: list[SamplingParams], seed: int, scale: float) -> None:
    """Every row of a batch of adjusted rows, over 6 steps, equals the per-token reference
    fed the row's own prompt and output so far (the sampler keeps that state itself)."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, V, (int(torch.randint(1, 12, (), generator=gen)),),
                             generator=gen).tolist() for _ in rows]
    samplers = [Sampler(p, prompt, stop_ids=EOS, vocab_size=V)
                for p, prompt in zip(rows, prompts, strict=True)]
    steps = [logits_of(seed + step, scale, rows=len(rows)) for step in range(6)]  # [B, V]
    got: list[list[int]] = [[] for _ in rows]
    for logits in steps:
        picked = pick_batch(logits, samplers)
        assert not any(picked.bad)
        for i, token in enumerate(picked.tokens):
            got[i].append(token)
    for i, params in enumerate(rows):
        expected = run_reference(params, prompts[i], [s[i] for s in steps])
        assert got[i] == expected, (i, params)
        if params.penalised:  # the row's own counts, kept on the device
            kept = samplers[i].counts
            assert kept is not None
            assert torch.equal(kept.long(), torch.bincount(torch.tensor(got[i]), minlength=V))


def test_penalised_rows_never_change_other_rows() -> None:
    """A mixed batch: plain rows (greedy and sampled) pick exactly what they pick alone,
    while penalised / biased / min_tokens rows beside them pick their own reference."""
    plain = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=21),
             SamplingParams(top_k=4, seed=22, logprobs=2)]
    adjusted = [SamplingParams(temperature=0.0, repetition_penalty=1.8),
                SamplingParams(seed=23, presence_penalty=2.0, frequency_penalty=2.0),
                SamplingParams(temperature=0.0, logit_bias=((5, 100.0), (6, -100.0))),
                SamplingParams(seed=24, min_tokens=4, logit_bias=((3, 50.0),))]
    order = [adjusted[0], plain[0], adjusted[1], plain[1], adjusted[2], plain[2], adjusted[3]]
    prompt = [1, 2, 3, 4, 5]
    mixed = [Sampler(p, prompt, stop_ids=EOS) for p in order]
    alone = {i: Sampler(p, prompt, stop_ids=EOS) for i, p in enumerate(order) if p in plain}
    outputs: list[list[int]] = [[] for _ in order]
    for step in range(8):
        logits = logits_of(300 + step, rows=len(order))  # [B, V]
        picked = pick_batch(logits, mixed)
        for i in range(len(order)):
            outputs[i].append(picked.tokens[i])
            if i in alone:
                own = pick_batch(logits[i:i + 1], [alone[i]])
                assert picked.tokens[i] == own.tokens[0], (step, i)
                assert picked.logprobs[i] == own.logprobs[0] and picked.top[i] == own.top[0]
    for i, params in enumerate(order):
        steps = [logits_of(300 + step, rows=len(order))[i] for step in range(8)]
        assert outputs[i] == run_reference(params, prompt, steps), i
    assert set(outputs[4]) == {5}  # +100 wins every step
    assert all(t not in EOS for t in outputs[6][:4]) and outputs[6][4] == 3  # then EOS


def test_the_adjustments_mean_what_openai_and_vllm_say() -> None:
    """The reference's numbers by hand: bias added; repetition divides a positive logit and
    multiplies a negative one of a token seen in the prompt or the output; frequency
    subtracts per occurrence in the output, presence once; the prompt alone is no
    occurrence for those two."""
    logits = torch.zeros(V)
    logits[1], logits[2], logits[4], logits[7] = 2.0, -2.0, 3.0, 1.0
    rep = adjusted_reference(logits, SamplingParams(repetition_penalty=2.0),
                             prompt=[1, 2], output=[4])
    assert (float(rep[1]), float(rep[2]), float(rep[4]), float(rep[7])) == (1.0, -4.0, 1.5, 1.0)
    pen = adjusted_reference(logits, SamplingParams(frequency_penalty=0.5,
                                                    presence_penalty=0.25),
                             prompt=[7], output=[4, 4, 4, 2])
    assert float(pen[4]) == pytest.approx(3.0 - 1.5 - 0.25)
    assert float(pen[2]) == pytest.approx(-2.0 - 0.5 - 0.25)
    assert float(pen[7]) == 1.0  # in the prompt only: untouched
    bias = adjusted_reference(logits, SamplingParams(logit_bias=((7, -100.0), (0, 5.5))))
    assert (float(bias[7]), float(bias[0])) == (-99.0, 5.5)
    banned = adjusted_reference(logits, SamplingParams(min_tokens=2), output=[1],
                                stop_ids=EOS)
    assert all(float(banned[t]) == float("-inf") for t in EOS)
    free = adjusted_reference(logits, SamplingParams(min_tokens=2), output=[1, 1],
                              stop_ids=EOS)
    assert torch.equal(free, logits)


def test_min_tokens_holds_eos_back_until_reached() -> None:
    logits = torch.zeros(V)
    logits[EOS[0]] = 50.0  # the model wants to stop at once
    params = SamplingParams(temperature=0.0, min_tokens=3)
    sampler = Sampler(params, [1], stop_ids=EOS)
    tokens = [pick_batch(logits.unsqueeze(0), [sampler]).tokens[0] for _ in range(5)]
    assert all(t not in EOS for t in tokens[:3]) and tokens[3:] == [EOS[0]] * 2
    ignoring = Sampler(params.model_copy(update={"ignore_eos": True}), [1], stop_ids=EOS)
    assert pick_batch(logits.unsqueeze(0), [ignoring]).tokens[0] == EOS[0]  # EOS is no stop


def test_a_row_with_nothing_left_to_pick_fails_alone() -> None:
    logits = torch.full((2, V), float("-inf"))
    logits[:, EOS[0]] = 0.0  # only EOS is possible, and min_tokens forbids it
    samplers = [Sampler(SamplingParams(temperature=0.0, min_tokens=1), stop_ids=EOS),
                Sampler(SamplingParams(temperature=0.0))]
    assert pick_batch(logits, samplers).bad == [True, False]
    with pytest.raises(NonFiniteLogitsError):
        pick_reference(logits[0], samplers[0].params, 0.0, stop_ids=EOS)


def test_adjustment_values_are_bounded_and_checked() -> None:
    with pytest.raises(ValueError, match="more than once"):
        SamplingParams(logit_bias=((1, 1.0), (1, 2.0)))
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=2, min_tokens=3)
    for bad in ({"logit_bias": ((1, 100.5),)}, {"presence_penalty": 2.5},
                {"frequency_penalty": -3.0}, {"repetition_penalty": 0.0},
                {"repetition_penalty": float("inf")},
                {"logit_bias": tuple((i, 1.0) for i in range(MAX_LOGIT_BIAS + 1))}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(RequestValidationError, match="outside the vocabulary"):
        Sampler(SamplingParams(logit_bias=((V, 1.0),)), vocab_size=V)


def test_huge_logits_with_a_tiny_repetition_penalty_stay_finite() -> None:
    """Dividing 1e38 by 1e-3 overflows float32: the adjusted logits are clamped, so the
    row still samples (and equals the reference)."""
    logits = logits_of(8, scale=1e38).clamp(-3e38, 3e38)
    params = SamplingParams(repetition_penalty=1e-3, seed=4)
    prompt = list(range(V))
    picked = pick_batch(logits.unsqueeze(0), [Sampler(params, prompt)])
    assert picked.bad == [False]
    assert picked.tokens[0] == pick_reference(logits, params, replayed(params)[0],
                                              prompt=prompt)
