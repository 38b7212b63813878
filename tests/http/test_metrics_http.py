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


def labels_of(scrape: str, name: str) -> dict[str, str]:
    """The labels of the one sample of ``name`` in a scrape."""
    found = re.findall(rf"^{re.escape(name)}{{([^}}]*)}} ", scrape, re.M)
    assert len(found) == 1, (name, found)
    return dict(re.findall(r'(\w+)="([^"]*)"', found[0]))


async def test_router_series_follow_a_live_stream(two_slots: LiveServer,
                                                  ref_base: nn.Module) -> None:
    """The endpoint-picker series (vLLM's names, tessera's prefix) while a stream runs:
    one running request, KV in use, its ``model`` name among the running LoRA adapters;
    after it ends nothing runs and its queue time was observed."""
    async with httpx.AsyncClient(base_url=two_slots.url, timeout=120) as client:
        api = Api(client)
        _, headers = await api.tenant()
        adapter = FACTORIES["lora"](ref_base, torch.Generator().manual_seed(5))
        r = await api.upload_tessera(headers, "router-lora", *artifact.dumps(adapter))
        assert r.status_code == 201, r.text
        await api.activate(headers, "router-task", "router-lora")
        before = (await client.get("/metrics")).text
        body = {"prompt": "hello", "max_tokens": 120, "temperature": 0, "ignore_eos": True,
                "stream": True}
        async with client.stream("POST", "/v1/tasks/router-task/generate", headers=headers,
                                 json=body) as s:
            assert s.status_code == 200, await s.aread()
            lines = s.aiter_lines()
            while not (await anext(lines)).startswith("data: "):
                pass
            during = (await client.get("/metrics")).text
        await asyncio.sleep(0.5)  # the closed stream's row leaves within a step
        after = (await client.get("/metrics")).text
    assert sample(during, "tessera:num_requests_running") == 1
    assert sample(during, "tessera:num_requests_waiting") == 0
    assert 0 < sample(during, "tessera:kv_cache_usage_perc") <= 1
    info = labels_of(during, "tessera:lora_requests_info")
    assert info == {"max_lora": "2", "running_lora_adapters": "router-task",
                    "waiting_lora_adapters": ""}
    assert 'tessera_adapters_resident{tier="device"}' in during
    assert sample(after, "tessera:num_requests_running") == 0
    assert sample(after, "tessera:kv_cache_usage_perc") == 0
    assert labels_of(after, "tessera:lora_requests_info")["running_lora_adapters"] == ""
    assert (sample(after, "tessera_request_queue_time_seconds_count")
            - sample(before, "tessera_request_queue_time_seconds_count")) == 1
