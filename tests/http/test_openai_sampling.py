"""Presence, frequency and repetition penalties, ``logit_bias`` and ``min_tokens`` over
real HTTP: greedy outputs equal a plain loop over the reference model that adjusts its
logits token by token (``adjusted_reference``, itself checked by hand in
``tests/engine/test_sampling.py``), a penalised request beside a plain one leaves the plain
one's tokens alone, and out-of-range values are 400 naming the field."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from openai import AsyncOpenAI, BadRequestError

from tessera.engine.sampling import SamplingParams, adjusted_reference
from tests.engine.conftest import Reference
from tests.http.conftest import Api
from tests.http.test_openai_client import client  # noqa: F401  (fixture)
from tests.live import LiveServer

N = 16


@torch.no_grad()
def adjusted_greedy(reference: Reference, prompt: str, params: SamplingParams,
                    eos: frozenset[int], n: int = N) -> list[int]:
    """Greedy tokens of the reference model with the adjustments applied to each step's
    logits (the whole sequence recomputed every token: no cache, no batch)."""
    ids, out = reference.ids(prompt), list[int]()
    for _ in range(n):
        logits = reference.base(input_ids=torch.tensor([ids + out])).logits[0, -1]  # [V]
        x = adjusted_reference(logits, params, prompt=ids, output=out, stop_ids=eos)
        out.append(int(x.argmax()))
        if out[-1] in eos and not params.ignore_eos:
            break
    return out


async def generate(api: Api, headers: dict[str, str], prompt: str, **fields: Any
                   ) -> dict[str, Any]:
    r = await api.client.post("/v1/tasks/base/generate", headers=headers, json={
        "prompt": prompt, "max_tokens": N, "temperature": 0, **fields})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


@pytest.mark.parametrize("fields", [
    {"presence_penalty": -2.0},
    {"frequency_penalty": -2.0},
    {"frequency_penalty": -2.0, "presence_penalty": 1.0},
    {"repetition_penalty": 1.6},
    {"repetition_penalty": 0.5, "frequency_penalty": 0.4},
    {"logit_bias": {"101": 6.0, "258": -3.0}},
])
async def test_penalties_and_bias_equal_the_reference(
        api: Api, live: LiveServer, reference: Reference, client: AsyncOpenAI,  # noqa: F811
        fields: dict[str, Any]) -> None:
    _, headers = await api.tenant()
    eos = live.app.state.engine.base.eos_token_ids
    prompt = "the the the cat sat on the mat"
    bias = tuple((int(k), v) for k, v in fields.get("logit_bias", {}).items())
    params = SamplingParams(temperature=0.0, ignore_eos=True,
                            **{**fields, "logit_bias": bias})
    want = adjusted_greedy(reference, prompt, params, eos)
    assert want != reference.greedy(None, prompt, N)  # the adjustment changes the output
    got = await generate(api, headers, prompt, ignore_eos=True, **fields)
    assert got["token_ids"] == want
    r = await client.completions.create(model="base", prompt=prompt, max_tokens=N,
                                        temperature=0, extra_body={"ignore_eos": True,
                                                                   **fields})
    assert r.choices[0].text == reference.text(want)


async def test_logit_bias_bans_and_forces(client: AsyncOpenAI, reference: Reference) -> None:  # noqa: F811
    prompt = "hello"
    top = reference.greedy(None, prompt, 1)[0]
    r = await client.completions.create(model="base", prompt=prompt, max_tokens=1,
                                        temperature=0, logit_bias={str(top): -100},
                                        extra_body={"ignore_eos": True})
    assert r.choices[0].text != reference.text([top])
    forced = reference.ids("z")[-1]
    r = await client.completions.create(model="base", prompt=prompt, max_tokens=6,
                                        temperature=1.5, seed=3, logit_bias={str(forced): 100},
                                        extra_body={"ignore_eos": True})
    assert r.choices[0].text == reference.text([forced] * 6)


async def test_min_tokens_holds_eos_back(api: Api, live: LiveServer) -> None:
    _, headers = await api.tenant()
    eos = min(live.app.state.engine.base.eos_token_ids)
    wants_to_stop = {"logit_bias": {str(eos): 100}}  # the model would end at once
    stopped = await generate(api, headers, "hi", **wants_to_stop)
    assert stopped["token_ids"] == [eos] and stopped["finish_reason"] == "stop"
    held = await generate(api, headers, "hi", min_tokens=4, **wants_to_stop)
    assert len(held["token_ids"]) == 5 and held["token_ids"][-1] == eos
    assert eos not in held["token_ids"][:4] and held["finish_reason"] == "stop"


async def test_a_penalised_request_leaves_its_batch_neighbours_alone(
        api: Api, reference: Reference) -> None:
    """Plain greedy requests running beside penalised and biased ones (the same steps)
    still give the reference's plain greedy tokens."""
    _, headers = await api.tenant()
    prompts = ["hello world", "The quick brown fox", "tessera", "0123456789"]
    adjusted: list[dict[str, Any]] = [{"frequency_penalty": 2.0}, {"repetition_penalty": 2.0},
                {"logit_bias": {"40": 100}}, {"min_tokens": 5, "presence_penalty": -2.0}]
    plain = [generate(api, headers, p, ignore_eos=True) for p in prompts]
    others = [generate(api, headers, p, ignore_eos=True, **f)
              for p, f in zip(prompts, adjusted, strict=True)]
    results = await asyncio.gather(*[x for pair in zip(plain, others, strict=True)
                                     for x in pair])
    for prompt, got in zip(prompts, results[::2], strict=True):
        assert got["token_ids"] == reference.greedy(None, prompt, N), prompt


@pytest.mark.parametrize(("fields", "param"), [
    ({"logit_bias": {"100000": 1.0}}, "logit_bias"),  # outside the vocabulary
    ({"logit_bias": {"5": 101.0}}, "logit_bias.5"),
    ({"logit_bias": {"05": 1.0}}, "logit_bias.05"),  # one spelling per token id
    ({"logit_bias": {"-1": 1.0}}, "logit_bias"),
    ({"logit_bias": {str(i): 1.0 for i in range(301)}}, "logit_bias"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
])
async def test_out_of_range_values_are_400_naming_the_field(
        client: AsyncOpenAI, fields: dict[str, Any], param: str) -> None:  # noqa: F811
    body: dict[str, Any] = {"max_tokens": 4, **fields}
    with pytest.raises(BadRequestError) as caught:
        await client.completions.create(model="base", prompt="hi", extra_body=body)
    assert caught.value.param == param, caught.value.body
