"""End-to-end fixtures: the real app served by uvicorn on a free loopback port (in its own
thread and event loop), a real redis-server, the built-in model; clients over real HTTP."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tessera.server.server_settings import ServerSettings
from tessera.store.embedded import EmbeddedRedis
from tessera.store.settings import StoreSettings
from tests.engine.conftest import (  # noqa: F401  (fixtures)
    builtin_dir,
    ref_base,
    ref_tokenizer,
    reference,
)
from tests.live import HermeticServerSettings, HermeticSettings, LiveServer
from tests.store.conftest import redis_server  # noqa: F401  (fixture)

ADMIN_KEY = "admin-" + "k" * 32
UPLOAD_LIMIT = 1 << 20
CONTEXT_LIMIT = 128




def server_settings(redis: EmbeddedRedis, builtin: Path, **engine: Any) -> ServerSettings:
    engine_values: dict[str, Any] = {
        "builtin_dir": builtin, "device": "cpu", "dtype": "float32", "num_slots": 8,
        "max_rank": 8, "max_bottleneck_dim": 16, "context_limit": CONTEXT_LIMIT, **engine}
    return HermeticServerSettings(
        admin_key=ADMIN_KEY, max_upload_bytes=UPLOAD_LIMIT, max_archive_bytes=UPLOAD_LIMIT,
        engine=HermeticSettings(**engine_values),
        store=StoreSettings(redis_url=redis.url, key_prefix=f"h{uuid.uuid4().hex[:12]}"))


@pytest.fixture(scope="session")
def live(redis_server: EmbeddedRedis, builtin_dir: Path) -> Iterator[LiveServer]:  # noqa: F811
    with LiveServer(server_settings(redis_server, builtin_dir)) as server:
        yield server


class Api:
    """An httpx client on the live server plus tenant helpers."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def tenant(self) -> tuple[str, dict[str, str]]:
        """A fresh tenant: (name, auth headers)."""
        name = f"t{uuid.uuid4().hex[:10]}"
        r = await self.client.post("/v1/tenants", json={"name": name}, headers=admin())
        assert r.status_code == 201, r.text
        return name, {"Authorization": f"Bearer {r.json()['api_key']}"}

    async def upload_tessera(self, headers: dict[str, str], name: str, manifest: bytes,
                             weights: bytes) -> httpx.Response:
        return await self.client.post(
            f"/v1/adapters/{name}", headers=headers,
            files={"config": ("manifest.json", manifest, "application/json"),
                   "weights": ("weights.safetensors", weights, "application/octet-stream")})

    async def activate(self, headers: dict[str, str], task: str, adapter: str,
                       version: int = 1) -> None:
        r = await self.client.post(f"/v1/tasks/{task}/activate", headers=headers,
                                   json={"adapter": adapter, "version": version})
        assert r.status_code == 200, r.text


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


async def wait_idle(app_server: LiveServer) -> None:
    """Let the engine finish rows of cancelled requests before a test measures it."""
    engine = app_server.app.state.engine
    for _ in range(200):
        stats = engine.stats()
        if stats.queue_depth == 0 and stats.running_rows == 0:
            return
        await asyncio.sleep(0.05)


@pytest.fixture
async def api(live: LiveServer) -> AsyncIterator[Api]:
    async with httpx.AsyncClient(base_url=live.url, timeout=120) as client:
        yield Api(client)
