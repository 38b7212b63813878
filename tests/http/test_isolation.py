"""Isolation matrix over real HTTP: every tenant endpoint x another tenant's task or
adapter answers 404 exactly like an unknown one; bad or missing keys answer 401."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from tessera.adapters import artifact
from tests.factories import FACTORIES
from tests.http.conftest import Api

# (method, path, json body); {task} / {adapter} name the *owner's* objects
ENDPOINTS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/v1/adapters/{adapter}", None),
    ("DELETE", "/v1/adapters/{adapter}/versions/1", None),
    ("POST", "/v1/tasks/{task}/activate", {"adapter": "{adapter}", "version": 1}),
    ("POST", "/v1/tasks/{task}/deactivate", None),
    ("GET", "/v1/tasks/{task}", None),
    ("POST", "/v1/tasks/{task}/generate", {"prompt": "hi", "max_tokens": 2}),
    ("POST", "/v1/completions", {"model": "{task}", "prompt": "hi", "max_tokens": 2}),
    ("POST", "/v1/chat/completions",
     {"model": "{task}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
]


def fill(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**names)
    if isinstance(value, dict):
        return {k: fill(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, names) for v in value]
    return value


async def test_isolation_matrix(api: Api, ref_base: nn.Module) -> None:
    _, owner = await api.tenant()
    _, other = await api.tenant()
    manifest, weights = artifact.dumps(FACTORIES["lora"](ref_base,
                                                         torch.Generator().manual_seed(9)))
    assert (await api.upload_tessera(owner, "secret", manifest, weights)).status_code == 201
    await api.activate(owner, "private", "secret")
    mine = {"task": "private", "adapter": "secret"}
    unknown = {"task": "nosuchtask", "adapter": "nosuchadapter"}
    for method, path, body in ENDPOINTS:
        answers = []
        for names in (mine, unknown):
            r = await api.client.request(method, fill(path, names), headers=other,
                                         json=fill(body, names))
            assert r.status_code == 404, (method, path, names, r.text)
            answers.append(r.json()["error"]["message"].replace(names["task"], "X")
                           .replace(names["adapter"], "X"))
        assert answers[0] == answers[1], (method, path, answers)
    # listings show nothing of the owner's
    assert (await api.client.get("/v1/adapters", headers=other)).json() == {"adapters": []}
    assert (await api.client.get("/v1/tasks", headers=other)).json() == {"tasks": []}
    models = (await api.client.get("/v1/models", headers=other)).json()["data"]
    assert [m["id"] for m in models] == ["base"]
    # and the owner still has everything
    r = await api.client.get("/v1/tasks/private", headers=owner)
    assert r.status_code == 200 and r.json()["adapter"] == "secret"


@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", "Basic abc", "Bearer x y"])
async def test_bad_or_missing_key_is_401(api: Api, auth: str | None) -> None:
    headers = {} if auth is None else {"Authorization": auth}
    for method, path, body in [*ENDPOINTS, ("GET", "/v1/adapters", None),
                               ("GET", "/v1/tasks", None), ("GET", "/v1/models", None),
                               ("POST", "/v1/tenants", {"name": "x"})]:
        r = await api.client.request(method, fill(path, {"task": "t", "adapter": "a"}),
                                     headers=headers, json=fill(body, {"task": "t",
                                                                       "adapter": "a"}))
        assert r.status_code == 401, (method, path, r.text)
        assert r.json()["error"]["type"] == "unauthorized"


async def test_tenant_key_cannot_create_tenants(api: Api) -> None:
    _, headers = await api.tenant()
    r = await api.client.post("/v1/tenants", headers=headers, json={"name": "x"})
    assert r.status_code == 403
