"""Admission over real HTTP: a full queue answers 429 with Retry-After (never an unbounded
wait), and a client leaving a stream cancels its row."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tessera.store.embedded import EmbeddedRedis
from tests.http.conftest import Api, LiveServer, server_settings, wait_idle


@pytest.fixture(scope="module")
def tight(redis_server: EmbeddedRedis, builtin_dir: Path) -> Iterator[LiveServer]:
    settings = server_settings(redis_server, builtin_dir, max_queue=1, max_batch_rows=1,
                               context_limit=2048)
    with LiveServer(settings) as server:
        yield server


async def test_queue_full_is_429_with_retry_after(tight: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=tight.url, timeout=120) as client:
        api = Api(client)
        _, headers = await api.tenant()
        body = {"prompt": "hello", "max_tokens": 64, "temperature": 0, "ignore_eos": True}
        results = await asyncio.gather(*(
            client.post("/v1/tasks/base/generate", headers=headers, json=body)
            for _ in range(8)))
        statuses = sorted(r.status_code for r in results)
        assert 200 in statuses and 429 in statuses, statuses
        assert set(statuses) == {200, 429}
        for r in results:
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1
                assert r.json()["error"]["type"] == "queue_full"
                assert "queue full" in r.json()["error"]["message"]
            else:
                assert len(r.json()["token_ids"]) == 64


async def test_disconnect_mid_stream_cancels_the_row(tight: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=tight.url, timeout=120) as client:
        api = Api(client)
        _, headers = await api.tenant()
        body = {"prompt": "hello", "max_tokens": 1000, "temperature": 0,
                "ignore_eos": True, "stream": True}
        async with client.stream("POST", "/v1/tasks/base/generate", headers=headers,
                                 json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break  # leave after the first token
        engine = tight.app.state.engine
        await wait_idle(tight)
        stats = engine.stats()
        assert stats.running_rows == 0 and stats.queue_depth == 0
        assert stats.finished.get("cancelled", 0) >= 1
