"""Real redis-server processes on free loopback ports, started and stopped by fixtures."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from tessera.store.client import connect
from tessera.store.embedded import EmbeddedRedis, free_port
from tessera.store.keys import Keys
from tessera.store.settings import StoreSettings
from tessera.store.store import AdapterStore


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """One shared server for contract tests (each test uses its own key prefix)."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A private server a test may kill, stop and restart (appendfsync always)."""
    server = EmbeddedRedis(tmp_path / "redis", port=free_port(), appendfsync="always")
    server.start()
    yield server
    server.kill()


@pytest.fixture
def keys() -> Keys:
    """A fresh key space per test on the shared server."""
    return Keys(prefix=f"t{uuid.uuid4().hex[:12]}")


def store_settings(**overrides: object) -> StoreSettings:
    """Explicit test settings (never the environment's); small chunks by default so
    multi-chunk blobs stay small."""
    values: dict[str, object] = {"chunk_bytes": 1024, "history_limit": 1000}
    values.update(overrides)
    return StoreSettings(**values)  # type: ignore[arg-type]


MakeStore = Callable[..., Awaitable[AdapterStore]]


@pytest.fixture
async def make_store(redis_server: EmbeddedRedis, keys: Keys) -> AsyncIterator[MakeStore]:
    """``await make_store(**settings)``: an AdapterStore on the shared server in this test's
    key space, each with its own connection pool (closed at teardown)."""
    clients: list[Redis] = []

    async def make(**overrides: object) -> AdapterStore:
        settings = store_settings(**overrides)
        client = connect(redis_server.url, settings)
        clients.append(client)
        return AdapterStore(client, keys, settings)

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
async def store(make_store: MakeStore) -> AdapterStore:
    """An AdapterStore with the default test settings (1 KiB chunks)."""
    return await make_store()


@pytest.fixture
async def redis_client(redis_server: EmbeddedRedis) -> AsyncIterator[Redis]:
    """A plain client on the shared server, for looking at keys directly."""
    client = connect(redis_server.url, store_settings())
    yield client
    await client.aclose()


async def scan_keys(redis: Redis, pattern: str) -> list[str]:
    """Every key matching ``pattern`` (SCAN, not KEYS), decoded and sorted."""
    found = [k.decode() if isinstance(k, bytes) else str(k)
             async for k in redis.scan_iter(match=pattern, count=1000)]
    return sorted(found)
