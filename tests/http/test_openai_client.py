"""The official ``openai`` client against the live server: ``max_completion_tokens``,
logprobs with their top alternatives (equal to an independent log-softmax of the reference
model), the ``include_usage`` chunk, model objects, and the fields tessera refuses (400,
with ``param`` and ``code`` as the client exposes them). More OpenAI behaviour:
``test_openai_choices.py`` (n, prompt batches, echo, chat text parts),
``test_openai_sampling.py`` (penalties, logit_bias, min_tokens), ``test_openai_errors.py``
(the error shape), ``test_openai_lora.py`` (vLLM's runtime LoRA endpoints)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from openai import AsyncOpenAI, BadRequestError

from tests.engine.conftest import Reference
from tests.http.conftest import Api
from tests.live import LiveServer


def log_softmax_steps(reference: Reference, prompt_ids: list[int], tokens: list[int]
                      ) -> list[torch.Tensor]:
    """The reference model's log-probabilities before each generated token ``[V]``."""
    out = []
    with torch.no_grad():
        for i in range(len(tokens)):
            logits = reference.base(input_ids=torch.tensor([prompt_ids + tokens[:i]])).logits
            row = logits[0, -1].double()
            out.append(row - torch.logsumexp(row, dim=-1))
    return out


@pytest.fixture
async def client(live: LiveServer, api: Api) -> Any:
    _, headers = await api.tenant()
    key = headers["Authorization"].removeprefix("Bearer ")
    async with AsyncOpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0) as c:
        yield c


async def test_completion_logprobs_and_max_completion_tokens(client: AsyncOpenAI,
                                                             reference: Reference) -> None:
    prompt = "The quick brown fox"
    r = await client.completions.create(model="base", prompt=prompt, max_tokens=4,
                                        temperature=0, logprobs=3,
                                        extra_body={"ignore_eos": True})
    choice = r.choices[0]
    assert r.usage is not None and r.usage.completion_tokens == 4
    assert choice.logprobs is not None
    tokens = reference.greedy(None, prompt, 4)
    steps = log_softmax_steps(reference, reference.ids(prompt), tokens)
    assert choice.logprobs.token_logprobs is not None
    for logp, got in zip(steps, choice.logprobs.token_logprobs, strict=True):
        assert got == pytest.approx(float(logp.max()), abs=1e-4)  # greedy: the top token
    assert choice.logprobs.top_logprobs is not None
    for logp, top in zip(steps, choice.logprobs.top_logprobs, strict=True):
        # the legacy shape keys alternatives by their text: two ids decoding alike (byte
        # tokens of one character, say) share one key, so compare values by membership
        best = torch.topk(logp, 3).values.tolist()
        assert max(top.values()) == pytest.approx(best[0], abs=1e-4)
        assert all(any(abs(v - b) < 1e-4 for b in best) for v in top.values()), (top, best)
    assert choice.logprobs.tokens is not None
    assert "".join(choice.logprobs.tokens).strip() == choice.text.strip()


async def test_chat_logprobs_max_completion_tokens_and_usage_chunk(
        client: AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "hello"}]
    r = await client.chat.completions.create(
        model="base", messages=messages, max_completion_tokens=3, temperature=0,
        logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    assert r.usage is not None and r.usage.completion_tokens == 3  # not the default 256
    content = r.choices[0].logprobs.content if r.choices[0].logprobs else None
    assert content is not None and len(content) == 3
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-6)
        assert entry.bytes == list(entry.token.encode())
    stream = await client.chat.completions.create(
        model="base", messages=messages, max_completion_tokens=3, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == r.choices[0].message.content


async def test_model_objects(client: AsyncOpenAI, live: LiveServer) -> None:
    card = await client.models.retrieve("base")
    extra = card.model_extra or {}
    assert card.id == "base" and extra["parent"] is None
    assert extra["max_model_len"] == live.app.state.engine.base.context_limit
    listed = [m.id async for m in client.models.list()]
    assert "base" in listed
    with pytest.raises(Exception) as caught:
        await client.models.retrieve("no-such-task")
    assert getattr(caught.value, "status_code", None) == 404


@pytest.mark.parametrize("extra", [
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    {"response_format": {"type": "json_object"}}, {"best_of": 2}, {"suffix": "!"},
    {"echo": True}])  # echo: a completions field, vLLM's own on chat (not implemented)
async def test_an_unsupported_field_is_refused_naming_it(client: AsyncOpenAI,
                                                         extra: dict[str, Any]) -> None:
    messages: Any = [{"role": "user", "content": "hello"}]
    with pytest.raises(BadRequestError) as caught:
        await client.chat.completions.create(model="base", messages=messages, max_tokens=2,
                                             extra_body=extra)
    field = next(iter(extra))
    error = caught.value
    assert error.status_code == 400
    assert error.param == field and error.code == "unsupported_field"
    assert field in error.message


async def test_neutral_values_of_unsupported_fields_are_accepted(client: AsyncOpenAI) -> None:
    r = await client.completions.create(model="base", prompt="hi", max_tokens=2, best_of=1,
                                        presence_penalty=0, echo=False,
                                        extra_body={"suffix": None})
    assert r.usage is not None and r.usage.completion_tokens <= 2
