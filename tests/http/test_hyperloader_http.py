"""HyperLoader over real HTTP and real Redis: upload a hypernetwork, register a task, bind a
task to it; the first requests generate its adapter exactly once, the result is cached in
Redis and served; outputs equal the independent reference (``HYPERLOADER.generate`` run
here, then ``tessera.adapters.reference_model`` + a plain greedy loop)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import torch
from torch import nn

from tessera.adapters import artifact
from tessera.adapters import targets as tg
from tessera.adapters.hypernet import HyperNetwork
from tessera.adapters.method import Adapter
from tessera.adapters.methods.hyperloader import HYPERLOADER
from tessera.adapters.safeio import write_safetensors
from tessera.server.service import Service, decoded_size
from tessera.store.open import open_store
from tests.engine.conftest import Reference
from tests.factories import randn
from tests.factories.hyperloader import make_hypernetwork
from tests.http.conftest import Api, LiveServer
from tests.http.test_inference import expect, generate

PROMPTS = ("hello world", "a", "The quick brown fox jumps", "Once upon a time")


async def upload_hypernet(api: Api, headers: dict[str, str], name: str,
                          hypernet: HyperNetwork) -> httpx.Response:
    manifest, weights = artifact.dumps_hypernetwork(hypernet)
    return await api.client.post(
        f"/v1/hypernetworks/{name}", headers=headers,
        files={"manifest": ("manifest.json", manifest, "application/json"),
               "weights": ("hypernet.safetensors", weights, "application/octet-stream")})


async def register(api: Api, headers: dict[str, str], name: str, version: int, task: str,
                   embedding: torch.Tensor) -> httpx.Response:
    return await api.client.post(
        f"/v1/hypernetworks/{name}/versions/{version}/tasks/{task}", headers=headers,
        files={"embedding": ("embedding.safetensors",
                             write_safetensors({"embedding": embedding}))})


async def bind(api: Api, headers: dict[str, str], task: str, name: str, version: int,
               hyper_task: str) -> httpx.Response:
    return await api.client.post(f"/v1/tasks/{task}/activate", headers=headers, json={
        "hypernetwork": name, "version": version, "hyper_task": hyper_task})


def expected(ref_base: nn.Module, hypernet: HyperNetwork, task: str,
             embedding: torch.Tensor) -> Adapter:
    copy = HyperNetwork(hypernet.config, dict(hypernet.weights))
    copy.register_task(task, embedding)
    return HYPERLOADER.generate(copy, task, tg.discover(ref_base))


async def test_generated_once_cached_and_served(api: Api, live: LiveServer,
                                                ref_base: nn.Module,
                                                reference: Reference) -> None:
    tenant, headers = await api.tenant()
    gen = torch.Generator().manual_seed(21)
    hypernet = make_hypernetwork(ref_base, gen)
    r = await upload_hypernet(api, headers, "hn", hypernet)
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 1 and r.json()["tasks"] == []
    embedding = randn(gen, hypernet.config.task_dim, scale=1.0)
    r = await register(api, headers, "hn", 1, "ner", embedding)
    assert r.status_code == 201, r.text
    assert r.json()["tasks"] == ["ner"]
    r = await bind(api, headers, "ner-task", "hn", 1, "ner")
    assert r.status_code == 200, r.text
    assert r.json()["hypernetwork"] == "hn" and r.json()["hyper_task"] == "ner"
    assert r.json()["adapter"] is None

    service: Service = live.app.state.service
    before = service.generations
    jobs = [PROMPTS[i % len(PROMPTS)] for i in range(8)]
    bodies = await asyncio.gather(*(generate(api, headers, "ner-task", p) for p in jobs))
    assert service.generations == before + 1  # 8 concurrent first requests, one generation
    want = expected(ref_base, hypernet, "ner", embedding)
    for prompt, body in zip(jobs, bodies, strict=True):
        expect(reference, want, prompt, body)
    assert bodies[0]["token_ids"] != reference.greedy(None, jobs[0], len(bodies[0]["token_ids"]))

    # the generated entry is in Redis; a second replica-like service reads it, generating
    # nothing (its own store connection and an empty host cache)
    handle = await open_store(live.app.state.settings.store)
    try:
        entry = await handle.adapter_store().get_generated(tenant, "hn", 1, "ner")
        assert entry is not None and entry.size > 0
        replica = Service(live.app.state.settings, live.app.state.engine,
                          handle.cached_store(decoded_size))
        spec = await replica.adapter_for(tenant, "ner-task")
        assert spec is not None
        adapter = await spec.loader()
        assert replica.generations == 0
        for prompt in PROMPTS[:2]:
            assert reference.greedy(adapter, prompt, 8) == reference.greedy(want, prompt, 8)
    finally:
        await handle.close()
    # later requests on the serving replica generate nothing more
    body = await generate(api, headers, "ner-task", "hello world")
    expect(reference, want, "hello world", body)
    assert service.generations == before + 1


async def test_tasks_shipped_in_the_upload_are_registered(api: Api, ref_base: nn.Module,
                                                          reference: Reference) -> None:
    _, headers = await api.tenant()
    gen = torch.Generator().manual_seed(22)
    hypernet = make_hypernetwork(ref_base, gen)
    embedding = randn(gen, hypernet.config.task_dim, scale=1.0)
    hypernet.register_task("pos", embedding)
    r = await upload_hypernet(api, headers, "shipped", hypernet)
    assert r.status_code == 201, r.text
    assert r.json()["tasks"] == ["pos"]
    assert (await bind(api, headers, "pos-task", "shipped", 1, "pos")).status_code == 200
    body = await generate(api, headers, "pos-task", "hello world")
    expect(reference, expected(ref_base, hypernet, "pos", embedding), "hello world", body)


async def test_bad_input_isolation_and_bound_delete(api: Api, ref_base: nn.Module) -> None:
    _, headers = await api.tenant()
    _, other = await api.tenant()
    gen = torch.Generator().manual_seed(23)
    hypernet = make_hypernetwork(ref_base, gen)
    dim = hypernet.config.task_dim
    assert (await upload_hypernet(api, headers, "hn", hypernet)).status_code == 201

    def status(r: httpx.Response, code: int) -> dict[str, Any]:
        assert r.status_code == code, r.text
        body: dict[str, Any] = r.json() if r.content else {}
        return body

    # wrong embedding shape, NaN, not safetensors, bad names
    err = status(await register(api, headers, "hn", 1, "t1", torch.zeros(dim + 1)), 422)
    assert err["error"]["message"]
    status(await register(api, headers, "hn", 1, "t1",
                          torch.full((dim,), float("nan"))), 422)
    r = await api.client.post("/v1/hypernetworks/hn/versions/1/tasks/t1", headers=headers,
                              files={"embedding": ("e.safetensors", b"garbage!" * 4)})
    assert r.status_code in (415, 422), r.text
    status(await register(api, headers, "hn", 1, "bad..name!", torch.zeros(dim)), 400)
    status(await upload_hypernet(api, headers, "bad..name!", hypernet), 400)
    # a hypernetwork for another base (wrong layer count) is refused naming the field
    layers = hypernet.config.num_layers + 1
    other_base = HyperNetwork(hypernet.config.model_copy(update={"num_layers": layers}),
                              {**hypernet.weights,
                               "layer_embedding": torch.ones(layers, dim)})
    err = status(await upload_hypernet(api, headers, "wrong", other_base), 422)
    assert "num_layers" in err["error"].get("field", "") + err["error"]["message"]
    # activate needs exactly one target
    r = await api.client.post("/v1/tasks/x/activate", headers=headers, json={
        "adapter": "a", "hypernetwork": "hn", "version": 1, "hyper_task": "t1"})
    status(r, 422)
    status(await bind(api, headers, "x", "hn", 1, "unregistered"), 404)
    status(await bind(api, headers, "x", "hn", 2, "t1"), 404)

    status(await register(api, headers, "hn", 1, "t1", torch.ones(dim)), 201)
    # another tenant sees none of it
    status(await api.client.get("/v1/hypernetworks/hn/versions/1", headers=other), 404)
    status(await register(api, other, "hn", 1, "t2", torch.ones(dim)), 404)
    status(await bind(api, other, "x", "hn", 1, "t1"), 404)
    status(await api.client.delete("/v1/hypernetworks/hn/versions/1", headers=other), 404)
    assert (await api.client.get("/v1/hypernetworks", headers=other)).json() == {
        "hypernetworks": []}
    # deleting a bound version is a conflict; once unbound it goes
    status(await bind(api, headers, "x", "hn", 1, "t1"), 200)
    status(await api.client.delete("/v1/hypernetworks/hn/versions/1", headers=headers), 409)
    status(await api.client.post("/v1/tasks/x/deactivate", headers=headers), 200)
    status(await api.client.delete("/v1/hypernetworks/hn/versions/1", headers=headers), 204)
    status(await api.client.get("/v1/hypernetworks/hn/versions/1", headers=headers), 404)
