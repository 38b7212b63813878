"""Hardening over real HTTP (issue 7): numerically hostile sampling values, streams that
fail after their first bytes, request sizes, disconnected non-streaming clients,
readiness that takes no tenant capacity and no Redis, labels of rejected requests, deeply
nested JSON, and the docs switch."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from torch import nn

from tessera.adapters import artifact
from tessera.store.embedded import EmbeddedRedis, free_port
from tests.engine.conftest import Reference
from tests.factories import FACTORIES
from tests.http.conftest import Api, LiveServer, server_settings, wait_idle

CONTEXT = 2048


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A redis-server of this module's own: one test pauses it (SIGSTOP)."""
    with EmbeddedRedis(tmp_path_factory.mktemp("redis"), port=free_port()) as server:
        yield server


@pytest.fixture(scope="module")
def hard(own_redis: EmbeddedRedis, builtin_dir: Path) -> Iterator[LiveServer]:
    settings = server_settings(own_redis, builtin_dir, max_queue=2, max_batch_rows=2,
                               context_limit=CONTEXT)
    with LiveServer(settings) as server:
        yield server


@pytest.fixture
async def client(hard: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=hard.url, timeout=120) as c:
        yield c


def events_of(text: str) -> list[str]:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


@pytest.mark.parametrize("extra", [{"temperature": 1e-40}, {"top_p": 5e-324},
                                   {"temperature": 1e-30, "top_p": 1e-300, "top_k": 3}])
async def test_hostile_sampling_values_answer_greedy(client: httpx.AsyncClient,
                                                     reference: Reference,
                                                     extra: dict[str, Any]) -> None:
    _, headers = await Api(client).tenant()
    r = await client.post("/v1/completions", headers=headers, json={
        "model": "base", "prompt": "x", "max_tokens": 4, "seed": 5, **extra})
    assert r.status_code == 200, r.text
    # each of these keeps only the most likely token: greedy
    want = reference.text(reference.greedy(None, "x", 4))
    assert r.json()["choices"][0]["text"] == want


async def test_a_stream_failing_after_its_first_bytes_ends_with_an_error_event(
        hard: LiveServer, client: httpx.AsyncClient) -> None:
    """Fault injection: once the stream has sent its first token, its row's detokenizer
    raises (a row failure inside a running batch)."""
    _, headers = await Api(client).tenant()
    scheduler = hard.app.state.engine.scheduler
    trigger = [1, 2, 3, 7]

    def broken(ids: Any) -> str:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")

    async with client.stream("POST", "/v1/completions", headers=headers, json={
            "model": "base", "prompt": trigger, "max_tokens": 400, "temperature": 0,
            "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200
        lines = r.aiter_lines()
        first = await anext(lines)
        assert first.startswith("data: ") and "choices" in first
        row = next(s for s in scheduler.stepper.running if s.prompt == trigger)
        row.stream._decode = broken
        text = "\n".join([first] + [line async for line in lines])
    events = events_of(text)
    assert events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2])["error"]
    assert error["type"] == "generation_failed" and "injected" in error["message"]
    assert len(events) < 400  # it really failed mid-stream


async def test_request_bodies_are_bounded(hard: LiveServer, client: httpx.AsyncClient) -> None:
    _, headers = await Api(client).tenant()
    limit = hard.app.state.settings.max_request_bytes
    huge = json.dumps({"model": "base", "prompt": "a" * (limit + 10)})
    r = await client.post("/v1/completions", headers={**headers,
                          "Content-Type": "application/json"}, content=huge)
    assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
        yield b'{"model": "base", "prompt": "'
        for _ in range(limit // (1 << 20) + 2):
            yield b"a" * (1 << 20)
        yield b'"}'

    r = await client.post("/v1/completions", headers={**headers,
                          "Content-Type": "application/json"}, content=chunked())
    assert r.status_code == 413, r.text


async def test_huge_prompts_are_refused_before_tokenizing(hard: LiveServer,
                                                          client: httpx.AsyncClient) -> None:
    """3 MiB prompts (under the body limit) are refused by their byte length, with the
    numbers, and /healthz answers promptly meanwhile."""
    _, headers = await Api(client).tenant()
    prompt = "hello world " * (3 * (1 << 20) // 12)

    async def big() -> httpx.Response:
        return await client.post("/v1/completions", headers=headers, json={
            "model": "base", "prompt": prompt, "max_tokens": 1})

    async def health_latency() -> float:
        await asyncio.sleep(0.3)  # while the big requests are being handled
        start = time.monotonic()
        assert (await client.get("/healthz")).status_code == 200
        return time.monotonic() - start

    *answers, latency = await asyncio.gather(big(), big(), health_latency())
    for r in answers:
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "context_length_exceeded"
        assert f"{len(prompt)} bytes" in error["message"] and str(CONTEXT) in error["message"]
    assert latency < 1.0, latency


async def test_a_client_leaving_a_non_streaming_request_cancels_it(
        hard: LiveServer, client: httpx.AsyncClient) -> None:
    _, headers = await Api(client).tenant()
    engine = hard.app.state.engine
    await wait_idle(hard)
    before = engine.stats().finished.get("cancelled", 0)
    with pytest.raises(httpx.ReadTimeout):
        await client.post("/v1/completions", headers=headers, timeout=1.0, json={
            "model": "base", "prompt": "hi", "max_tokens": CONTEXT - 16, "temperature": 0,
            "ignore_eos": True})
    deadline = time.monotonic() + 3
    while engine.stats().running_rows and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    stats = engine.stats()
    assert stats.running_rows == 0 and stats.finished.get("cancelled", 0) == before + 1


async def test_readiness_takes_no_capacity_and_needs_no_redis(
        hard: LiveServer, client: httpx.AsyncClient, own_redis: EmbeddedRedis) -> None:
    _, headers = await Api(client).tenant()
    steps = hard.app.state.engine.stats().steps
    probes = await asyncio.gather(*(client.get("/readyz") for _ in range(64)))
    assert {r.status_code for r in probes} == {200}
    assert hard.app.state.engine.stats().steps == steps  # no generation was queued
    generated = await client.post("/v1/completions", headers=headers, json={
        "model": "base", "prompt": "hi", "max_tokens": 2})
    assert generated.status_code == 200, generated.text  # the queue (2) was never filled

    assert own_redis.pid is not None
    os.kill(own_redis.pid, signal.SIGSTOP)  # Redis hangs: no answer, no error
    try:
        for _ in range(3):
            start = time.monotonic()
            r = await client.get("/readyz")
            assert r.status_code == 200 and time.monotonic() - start < 1.0
        deadline = time.monotonic() + 20  # the store's health is reported, not required
        while r.json()["store"] == "ok" and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            r = await client.get("/readyz")
        assert r.status_code == 200 and r.json()["store"] == "unavailable"
    finally:
        os.kill(own_redis.pid, signal.SIGCONT)


async def test_rejected_adapter_requests_carry_their_method(
        hard: LiveServer, client: httpx.AsyncClient, ref_base: nn.Module) -> None:
    api = Api(client)
    _, headers = await api.tenant()
    adapter = FACTORIES["lora"](ref_base, torch.Generator().manual_seed(4))
    r = await api.upload_tessera(headers, "ad", *artifact.dumps(adapter))
    assert r.status_code == 201, r.text
    await api.activate(headers, "task", "ad")
    body = {"model": "task", "prompt": "hello", "max_tokens": 48, "temperature": 0,
            "ignore_eos": True}
    results = await asyncio.gather(*(client.post("/v1/completions", headers=headers,
                                                  json=body) for _ in range(10)))
    assert 429 in {r.status_code for r in results}
    scrape = (await client.get("/metrics")).text
    rejected = [line for line in scrape.splitlines()
                if line.startswith("tessera_requests_total") and 'outcome="rejected"' in line]
    assert rejected and all('method="lora"' in line for line in rejected), rejected


async def test_deeply_nested_json_is_named(client: httpx.AsyncClient) -> None:
    _, headers = await Api(client).tenant()
    nested = "[" * 100_000 + "]" * 100_000
    r = await client.post("/v1/completions", headers={**headers,
                          "Content-Type": "application/json"},
                          content=f'{{"model": "base", "prompt": {nested}}}')
    assert r.status_code in (400, 422), r.text
    assert "nest" in r.json()["error"]["message"].lower()


async def test_api_docs_are_a_setting(redis_server: EmbeddedRedis, builtin_dir: Path) -> None:
    settings = server_settings(redis_server, builtin_dir)
    off = settings.model_copy(update={"api_docs": False,
                                      "store": settings.store.model_copy(
                                          update={"key_prefix": uuid.uuid4().hex[:12]})})
    with LiveServer(off) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            assert (await c.get("/docs")).status_code == 404
            assert (await c.get("/redoc")).status_code == 404
            assert (await c.get("/healthz")).status_code == 200
