"""Helpers for tests that run several tessera "replicas" against real redis-servers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from tessera.store.cache import HostCache
from tessera.store.client import connect
from tessera.store.keys import Keys
from tessera.store.models import AdapterVersion
from tessera.store.resilient import CachedStore
from tessera.store.settings import StoreSettings
from tessera.store.store import AdapterStore
from tessera.store.watch import ChangeEvent, ChangeWatcher

TASK = "chat"
ADAPTER = "helper"


@dataclass(frozen=True)
class Decoded:
    """Stand-in for decoded tensors: the weights and their size."""

    data: bytes
    version: int

    @property
    def nbytes(self) -> int:
        return len(self.data)


class CountingDecoder:
    """``decode(weights, record)`` that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, weights: bytes, record: AdapterVersion) -> Decoded:
        self.calls += 1
        return Decoded(weights, record.version)


def weights_of(version: int) -> bytes:
    return bytes([version % 256]) * (1000 + version)


@contextlib.asynccontextmanager
async def replica(url: str, keys: Keys, settings: StoreSettings, *,
                  subscribe: bool = True,
                  stale_retry_s: float = 1.0) -> AsyncIterator[CachedStore]:
    """One replica's CachedStore with its own connection pool, watcher started."""
    redis = connect(url, settings)
    cached = CachedStore(AdapterStore(redis, keys, settings),
                         HostCache[str, Decoded](10**6, lambda d: d.nbytes),
                         ChangeWatcher(redis, keys, settings, subscribe=subscribe),
                         stale_retry_s=stale_retry_s)
    try:
        async with cached:
            yield cached
    finally:
        await redis.aclose()


async def seed(store: AdapterStore | CachedStore, tenant: str = "acme",
               versions: int = 2) -> str:
    """A tenant with ``versions`` versions of ADAPTER and TASK bound to version 1; returns
    the tenant's API key."""
    raw = store.store if isinstance(store, CachedStore) else store
    _, api_key = await raw.create_tenant(tenant)
    for v in range(1, versions + 1):
        record = await raw.put_adapter(
            tenant, ADAPTER, method="lora", format="tessera", config={"r": 4},
            manifest={"targets": ["q_proj"]}, weights=weights_of(v),
            base_fingerprint="base-0", uploader="tests")
        assert record.version == v
    await raw.activate(tenant, TASK, ADAPTER, 1, actor="tests")
    return api_key


class EventLog:
    """Collects a watcher's events; ``wait`` returns the first one matching."""

    def __init__(self, watcher: ChangeWatcher) -> None:
        self.events: list[ChangeEvent] = []
        self._changed = asyncio.Condition()
        watcher.add_listener(self._on_event)

    async def _on_event(self, event: ChangeEvent) -> None:
        async with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def clear(self) -> None:
        self.events.clear()

    async def wait(self, match: Callable[[ChangeEvent], bool],
                   timeout_s: float = 30.0) -> ChangeEvent:
        """``timeout_s`` only keeps a broken test from hanging; it is not a bound."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: any(match(e) for e in self.events))
        return next(e for e in self.events if match(e))
