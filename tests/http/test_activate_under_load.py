"""Activating a new version under load, over real HTTP and real Redis: while concurrent
greedy clients keep asking, the task flips from version 1 to version 2; every response is
wholly v1's reference output or wholly v2's, and once activate has returned new requests
get v2. A bound version cannot be deleted (409)."""

from __future__ import annotations

import asyncio

import torch
from torch import nn

from tessera.adapters import artifact
from tests.engine.conftest import Reference
from tests.factories import FACTORIES
from tests.http.conftest import Api
from tests.http.test_inference import N, generate

CLIENTS = 6
PROMPT = "The quick brown fox"


async def test_flip_under_load(api: Api, ref_base: nn.Module, reference: Reference) -> None:
    _, headers = await api.tenant()
    gen = torch.Generator().manual_seed(31)
    versions = [FACTORIES["lora"](ref_base, gen) for _ in range(2)]
    for number, adapter in enumerate(versions, start=1):
        r = await api.upload_tessera(headers, "flip", *artifact.dumps(adapter))
        assert r.status_code == 201 and r.json()["version"] == number, r.text
    want1, want2 = (tuple(reference.greedy(a, PROMPT, N)) for a in versions)
    assert want1 != want2
    await api.activate(headers, "flip-task", "flip", 1)

    results: list[tuple[int, ...]] = []
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            body = await generate(api, headers, "flip-task", PROMPT)
            results.append(tuple(body["token_ids"]))

    workers = [asyncio.create_task(client()) for _ in range(CLIENTS)]
    try:
        while len(results) < CLIENTS:
            await asyncio.sleep(0.02)
        await api.activate(headers, "flip-task", "flip", 2)  # under load
        after = [tuple((await generate(api, headers, "flip-task", PROMPT))["token_ids"])
                 for _ in range(3)]
        flipped_at = len(results)
        while len(results) < flipped_at + CLIENTS:
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert all(r in (want1, want2) for r in results), "a response mixed versions"
    assert want1 in results and want2 in results
    assert after == [want2] * 3  # after activate returned: v2 only
    assert results[-CLIENTS:] == [want2] * CLIENTS

    r = await api.client.delete("/v1/adapters/flip/versions/2", headers=headers)
    assert r.status_code == 409, r.text
    assert r.json()["error"]["type"] == "conflict"
    r = await api.client.delete("/v1/adapters/flip/versions/1", headers=headers)
    assert r.status_code == 204, r.text
