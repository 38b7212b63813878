"""OpenAI's ``n``, prompt batches, ``echo`` and chat text parts over real HTTP, with the
official ``openai`` client: each choice is its own engine request and equals the same
request sent alone (a seed gives choice j ``seed + j``), choices are indexed prompt by
prompt as OpenAI orders them, usage counts each prompt once and every choice's tokens,
streams carry each chunk's choice index, and the sizes are bounded before any work."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI, BadRequestError

from tests.engine.conftest import Reference
from tests.http.conftest import Api, wait_idle
from tests.http.test_openai_client import client  # noqa: F401  (fixture)
from tests.live import LiveServer

FREE = {"ignore_eos": True}  # every choice generates exactly max_tokens tokens


async def alone(client: AsyncOpenAI, prompt: str, seed: int | None, **kw: Any) -> str:  # noqa: F811
    r = await client.completions.create(model="base", prompt=prompt, max_tokens=5, seed=seed,
                                        extra_body=FREE, **kw)
    return str(r.choices[0].text)


async def test_n_choices_are_separate_requests_with_summed_usage(
        client: AsyncOpenAI, reference: Reference) -> None:  # noqa: F811
    r = await client.completions.create(model="base", prompt="hello", n=3, max_tokens=5,
                                        temperature=1.0, seed=41, extra_body=FREE)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(reference.ids("hello"))  # the prompt once
    assert r.usage.completion_tokens == 15 and r.usage.total_tokens == 15 + r.usage.prompt_tokens
    for j, c in enumerate(r.choices):  # choice j is the request alone with seed 41 + j
        assert c.text == await alone(client, "hello", 41 + j, temperature=1.0)
        assert c.finish_reason == "length"
    assert len({c.text for c in r.choices}) > 1
    greedy = await client.completions.create(model="base", prompt="hello", n=2, max_tokens=5,
                                             temperature=0, extra_body=FREE)
    want = reference.text(reference.greedy(None, "hello", 5))
    assert [c.text for c in greedy.choices] == [want, want]


async def test_a_prompt_batch_is_ordered_prompt_by_prompt(client: AsyncOpenAI,  # noqa: F811
                                                          reference: Reference) -> None:
    prompts = ["a", "The quick brown fox", "héllo"]
    r = await client.completions.create(model="base", prompt=prompts, n=2, max_tokens=5,
                                        temperature=0.9, seed=7, extra_body=FREE)
    assert [c.index for c in r.choices] == list(range(6))
    for c in r.choices:  # index = prompt * n + j, as OpenAI (and vLLM) order them
        prompt, j = prompts[c.index // 2], c.index % 2
        assert c.text == await alone(client, prompt, 7 + j, temperature=0.9), c.index
    assert r.usage is not None
    assert r.usage.prompt_tokens == sum(len(reference.ids(p)) for p in prompts)
    assert r.usage.completion_tokens == 30


async def test_streamed_choices_carry_their_index(client: AsyncOpenAI) -> None:  # noqa: F811
    body: dict[str, Any] = {"model": "base", "prompt": ["one", "two"], "n": 2, "max_tokens": 4,
                            "temperature": 1.0, "seed": 3, "extra_body": FREE}
    whole = await client.completions.create(**body)
    stream = await client.completions.create(**body, stream=True,
                                             stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage == whole.usage
    texts: dict[int, str] = {}
    finished: dict[int, str] = {}
    for chunk in chunks[:-1]:
        [choice] = chunk.choices
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        if choice.finish_reason is not None:
            assert choice.index not in finished
            finished[choice.index] = choice.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert finished == {i: "length" for i in range(4)}
    chat = await client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "hi"}], n=3, max_tokens=3,
        seed=9, stream=True, stream_options={"include_usage": True}, extra_body=FREE)
    chat_chunks = [chunk async for chunk in chat]
    assert {c.choices[0].index for c in chat_chunks[:-1]} == {0, 1, 2}
    assert chat_chunks[-1].usage is not None
    assert chat_chunks[-1].usage.completion_tokens == 9


async def test_chat_n_choices(client: AsyncOpenAI) -> None:  # noqa: F811
    messages: Any = [{"role": "user", "content": "hello"}]
    r = await client.chat.completions.create(model="base", messages=messages, n=2,
                                             max_tokens=4, seed=11, extra_body=FREE)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage is not None and r.usage.completion_tokens == 8
    for j, c in enumerate(r.choices):
        one = await client.chat.completions.create(model="base", messages=messages,
                                                   max_tokens=4, seed=11 + j, extra_body=FREE)
        assert c.message.content == one.choices[0].message.content
        assert r.usage.prompt_tokens == one.usage.prompt_tokens if one.usage else False


async def test_echo_prepends_the_prompt(client: AsyncOpenAI, reference: Reference) -> None:  # noqa: F811
    plain = await client.completions.create(model="base", prompt=["hi", "yo"], max_tokens=4,
                                            temperature=0, extra_body=FREE)
    echoed = await client.completions.create(model="base", prompt=["hi", "yo"], max_tokens=4,
                                             temperature=0, echo=True, extra_body=FREE)
    assert [c.text for c in echoed.choices] == [p + c.text for p, c in
                                                zip(["hi", "yo"], plain.choices, strict=True)]
    assert echoed.usage == plain.usage
    stream = await client.completions.create(model="base", prompt="hi", max_tokens=4,
                                             temperature=0, echo=True, stream=True,
                                             extra_body=FREE)
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].text.startswith("hi")
    assert "".join(c.choices[0].text for c in chunks) == echoed.choices[0].text
    ids = reference.ids("ok")
    by_ids = await client.completions.create(model="base", prompt=ids, max_tokens=2,
                                             temperature=0, echo=True, extra_body=FREE)
    decoded = reference.tokenizer.decode(ids)
    assert by_ids.choices[0].text.startswith(decoded)


async def test_echo_with_logprobs_is_refused_naming_both(client: AsyncOpenAI) -> None:  # noqa: F811
    with pytest.raises(BadRequestError) as caught:
        await client.completions.create(model="base", prompt="hi", max_tokens=2, echo=True,
                                        logprobs=1)
    assert caught.value.param == "echo" and caught.value.code == "unsupported_field"
    assert "echo" in caught.value.message and "logprobs" in caught.value.message


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "hi", "n": 17}, "n"),  # over the server's max_choices (16)
    ({"prompt": ["a"] * 9, "n": 2}, "n"),  # 18 choices
    ({"prompt": "hi", "n": 129}, "n"),  # over the schema's ceiling
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": ["a"] * 129}, "prompt"),
    ({"prompt": [[1, 2], [3]]}, "prompt"),  # token-id batches stay refused
    ({"prompt": ["a", ""]}, "prompt.1"),
])
async def test_sizes_are_bounded_before_any_work(client: AsyncOpenAI, live: LiveServer,  # noqa: F811
                                                 body: dict[str, Any], param: str) -> None:
    before = live.app.state.engine.stats().steps
    with pytest.raises(BadRequestError) as caught:
        await client.completions.create(model="base", max_tokens=2, **body)
    assert caught.value.param == param, caught.value.body
    assert live.app.state.engine.stats().steps == before  # nothing was generated


async def test_token_id_batches_say_why(client: AsyncOpenAI) -> None:  # noqa: F811
    with pytest.raises(BadRequestError) as caught:
        await client.completions.create(model="base", prompt=[[1, 2], [3]], max_tokens=2)
    assert caught.value.code == "unsupported_field" and "list of strings" in caught.value.message


async def test_chat_text_parts(client: AsyncOpenAI, reference: Reference) -> None:  # noqa: F811
    parts: Any = [{"role": "system", "content": [{"type": "text", "text": "be brief"}]},
                  {"role": "user", "content": [{"type": "text", "text": "hel"},
                                               {"type": "text", "text": "lo"}]}]
    joined: Any = [{"role": "system", "content": "be brief"},
                   {"role": "user", "content": "hel\nlo"}]
    a = await client.chat.completions.create(model="base", messages=parts, max_tokens=5,
                                             temperature=0, extra_body=FREE)
    b = await client.chat.completions.create(model="base", messages=joined, max_tokens=5,
                                             temperature=0, extra_body=FREE)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage == b.usage
    image: Any = [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]}]
    with pytest.raises(BadRequestError) as caught:
        await client.chat.completions.create(model="base", messages=image, max_tokens=2)
    assert caught.value.param == "messages.0.content.1.type"
    assert caught.value.code == "unsupported_field" and "image_url" in caught.value.message


async def test_a_client_leaving_cancels_every_choice(api: Api, live: LiveServer) -> None:
    """A client that leaves (a non-streaming request timing out, a stream closed after its
    first chunk) takes every one of its choices out of the batch, none runs to its end."""
    _, headers = await api.tenant()
    engine = live.app.state.engine
    body = {"model": "base", "prompt": "bye", "n": 16, "max_tokens": 120, "ignore_eos": True,
            "temperature": 0}

    def cancelled() -> int:
        return int(engine.stats().finished.get("cancelled", 0))

    await wait_idle(live)
    before = cancelled()
    with pytest.raises(httpx.TimeoutException):
        await api.client.post("/v1/completions", headers=headers, json=body, timeout=0.2)
    await wait_idle(live)
    assert cancelled() == before + 16
    async with api.client.stream("POST", "/v1/completions", headers=headers,
                                 json={**body, "n": 3, "stream": True}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                break  # leave after the first chunk
    await wait_idle(live)
    assert cancelled() == before + 19
    stats = engine.stats()
    assert stats.running_rows == 0 and stats.queue_depth == 0
