"""/metrics over real HTTP: more adapters in use than device slots still answer correctly,
and the evictions, requests and tokens appear in the Prometheus scrape."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from torch import nn

from tessera.adapters import artifact
from tessera.store.embedded import EmbeddedRedis
from tests.engine.conftest import Reference
from tests.factories import FACTORIES
from tests.http.conftest import Api, LiveServer, server_settings
from tests.http.test_inference import expect, generate


@pytest.fixture(scope="module")
def two_slots(redis_server: EmbeddedRedis, builtin_dir: Path) -> Iterator[LiveServer]:
    with LiveServer(server_settings(redis_server, builtin_dir, num_slots=2)) as server:
        yield server


def sample(scrape: str, name: str, *, required: bool = True) -> float:
    """Sum of every sample of ``name`` (all label sets) in a Prometheus text scrape; a
    labelled counter with no children yet is absent (0) unless ``required``."""
    values = [float(m.group(1)) for m in
              re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", scrape, re.M)]
    assert values or not required, f"{name} missing from /metrics"
    return sum(values)


async def test_more_adapters_than_slots_are_correct_and_evictions_counted(
        two_slots: LiveServer, ref_base: nn.Module, reference: Reference) -> None:
    async with httpx.AsyncClient(base_url=two_slots.url, timeout=120) as client:
        api = Api(client)
        _, headers = await api.tenant()
        gen = torch.Generator().manual_seed(21)
        methods = ("lora", "dora", "hra", "hut", "soka")  # 5 adapters, 2 device slots
        made = {m: FACTORIES[m](ref_base, gen) for m in methods}
        for method, adapter in made.items():
            r = await api.upload_tessera(headers, f"m-{method}", *artifact.dumps(adapter))
            assert r.status_code == 201, r.text
            await api.activate(headers, f"t-{method}", f"m-{method}")
        before = (await client.get("/metrics")).text
        jobs = [m for _ in range(2) for m in methods]
        results = await asyncio.gather(*(generate(api, headers, f"t-{m}", "hello") for m in jobs))
        for method, body in zip(jobs, results, strict=True):
            expect(reference, made[method], "hello", body)
        after = (await client.get("/metrics")).text
    assert sample(after, "tessera_slot_evictions_total") > 0
    assert (sample(after, "tessera_requests_total")
            - sample(before, "tessera_requests_total", required=False)) == len(jobs)
    assert (sample(after, "tessera_completion_tokens_total")
            - sample(before, "tessera_completion_tokens_total", required=False)) == sum(
                len(b["token_ids"]) for b in results)
    assert sample(after, "tessera_time_to_first_token_seconds_count") >= len(jobs)
    # every adapter came from Redis at least once (first use), none from nowhere
    assert sample(after, "tessera_adapter_load_seconds_count") >= len(methods)
    assert 'source="redis"' in after
