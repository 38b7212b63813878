"""Real redis-server processes on free loopback ports, started and stopped by fixtures."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from store.embedded import EmbeddedRedis, free_port
from store.keys import Keys


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
