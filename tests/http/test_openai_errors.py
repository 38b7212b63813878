"""Errors in OpenAI's shape over real HTTP: every error body is ``{"error": {"message",
"type", "param", "code"}}`` (plus tessera's ``field`` when one is to blame), the official
``openai`` client's exceptions expose ``param`` and ``code``, a body failing validation is
400 on the OpenAI routes (422 on tessera's own, unchanged), and tessera's other statuses
stay what they were."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from openai import (
    AsyncOpenAI,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    PermissionDeniedError,
)

from tests.http.conftest import CONTEXT_LIMIT, Api, admin
from tests.http.test_openai_client import client  # noqa: F401  (fixture)
from tests.live import LiveServer

CHAT = [{"role": "user", "content": "hi"}]


def shape(r: httpx.Response, status: int) -> dict[str, Any]:
    """The error object, checked to be OpenAI's shape (and tessera's)."""
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert {"message", "type", "param", "code"} <= set(err) <= {
        "message", "type", "param", "code", "field"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert err["code"] == err["type"] and err["param"] == err.get("field")
    return err


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"model": "base", "prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "x"}, "model"),
    ("/v1/completions", {"model": "base", "prompt": "x", "max_tokens": "2"}, "max_tokens"),
    ("/v1/completions", {"model": "base", "prompt": "x", "n": 2.5}, "n"),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "robot",
                                                            "content": "x"}]},
     "messages.0.role"),
    ("/v1/chat/completions", {"model": "base", "messages": CHAT, "top_logprobs": 21},
     "top_logprobs"),
])
async def test_validation_is_400_naming_the_param(api: Api, path: str, body: dict[str, Any],
                                                  param: str) -> None:
    _, headers = await api.tenant()
    err = shape(await api.client.post(path, headers=headers, json=body), 400)
    assert err["param"] == param and err["code"] == "invalid_request"
    assert param in err["message"]


async def test_tesseras_own_routes_keep_422(api: Api) -> None:
    _, headers = await api.tenant()
    r = await api.client.post("/v1/tasks/base/generate", headers=headers,
                              json={"prompt": "x", "temperature": -1})
    assert shape(r, 422)["param"] == "temperature"
    r = await api.client.post("/v1/tasks/t/activate", headers=headers,
                              json={"adapter": "a", "version": 0})
    assert shape(r, 422)["param"] == "version"


async def test_the_openai_client_sees_param_and_code(client: AsyncOpenAI) -> None:  # noqa: F811
    messages: Any = CHAT
    with pytest.raises(BadRequestError) as bad:
        await client.chat.completions.create(model="base", messages=messages, temperature=-1)
    assert bad.value.param == "temperature" and bad.value.code == "invalid_request"
    with pytest.raises(BadRequestError) as long:
        await client.completions.create(model="base", prompt="hello",
                                        max_tokens=CONTEXT_LIMIT)
    assert long.value.code == "context_length_exceeded"
    assert str(CONTEXT_LIMIT) in long.value.message
    with pytest.raises(BadRequestError) as name:
        await client.completions.create(model="../x", prompt="x")
    assert name.value.code == "invalid_name"
    with pytest.raises(NotFoundError) as unknown:
        await client.completions.create(model="no-such-task", prompt="x")
    assert unknown.value.code == "not_found" and unknown.value.param is None


async def test_other_statuses_are_kept(live: LiveServer, api: Api) -> None:
    async with AsyncOpenAI(base_url=f"{live.url}/v1", api_key="wrong",
                           max_retries=0) as stranger:
        with pytest.raises(AuthenticationError) as caught:
            await stranger.models.list()
        assert caught.value.code == "unauthorized"
    async with AsyncOpenAI(base_url=f"{live.url}/v1", api_key=admin()["Authorization"][7:],
                           max_retries=0) as administrator:
        with pytest.raises(PermissionDeniedError) as denied:
            await administrator.models.list()
        assert denied.value.code == "forbidden"
    _, headers = await api.tenant()
    huge = json.dumps({"model": "base", "prompt": "a" * (5 << 20)})
    r = await api.client.post("/v1/completions", headers={**headers,
                              "Content-Type": "application/json"}, content=huge)
    assert shape(r, 413)["code"] == "payload_too_large"
    r = await api.client.get("/v1/models/a..b", headers=headers)
    assert shape(r, 400)["code"] == "invalid_name"
