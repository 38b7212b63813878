"""Durability: with ``appendfsync always``, an upload confirmed to the caller survives a
``kill -9`` of redis-server in the middle of a stream of uploads."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from typing import Any

import pytest
from redis.commands.core import AsyncScript

from tessera.store.client import connect
from tessera.store.embedded import EmbeddedRedis
from tessera.store.errors import StoreUnavailableError
from tessera.store.keys import Keys
from tessera.store.store import AdapterStore
from tests.store.conftest import store_settings

UPLOADERS = 4
KILL_AFTER = 24  # confirmations before the kill


async def test_every_confirmed_upload_survives_kill_9(own_redis: EmbeddedRedis) -> None:
    settings = store_settings(chunk_bytes=4096, retries=1, socket_timeout_s=1.0)
    client = connect(own_redis.url, settings)
    store = AdapterStore(client, Keys(prefix="durable"), settings)
    try:
        await store.create_tenant("acme")
        confirmed: list[tuple[str, int, bytes]] = []
        failures: list[StoreUnavailableError] = []
        enough = asyncio.Event()

        async def uploader(i: int) -> None:
            rng = random.Random(i)
            while True:
                data = os.urandom(rng.randrange(1, 40_000))  # 1 to 10 chunks
                try:
                    record = await store.put_adapter(
                        "acme", f"ad{i}", method="lora", format="peft", config={"i": i},
                        manifest={}, weights=data, base_fingerprint="fp", uploader="u")
                except StoreUnavailableError as exc:
                    failures.append(exc)
                    return
                confirmed.append((record.name, record.version, data))
                if len(confirmed) >= KILL_AFTER:
                    enough.set()

        async def killer() -> None:
            await enough.wait()
            own_redis.kill()  # SIGKILL while the other uploaders are mid-upload

        await asyncio.gather(killer(), *(uploader(i) for i in range(UPLOADERS)))
        assert len(confirmed) >= KILL_AFTER
        assert len(failures) == UPLOADERS  # every uploader was cut off by the kill

        own_redis.start()  # same data directory: redis-server replays its AOF
        # the same store object reconnects by itself
        for name, version, data in confirmed:
            record = await store.get_version("acme", name, version)
            assert record.sha256 == hashlib.sha256(data).hexdigest()
            assert await store.get_weights("acme", name, version) == data  # sha-verified
        # and keeps numbering after what survived
        for i in range(UPLOADERS):
            versions = [v.version for v in await store.list_versions("acme", f"ad{i}")]
            mine = sorted(v for name, v, _ in confirmed if name == f"ad{i}")
            assert versions[:len(mine)] == mine
            again = await store.put_adapter(
                "acme", f"ad{i}", method="lora", format="peft", config={}, manifest={},
                weights=b"after", base_fingerprint="fp", uploader="u")
            assert again.version == (versions[-1] if versions else 0) + 1
    finally:
        await client.aclose()


async def test_a_replayed_write_is_applied_once(store: AdapterStore,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """redis-py re-sends a command whose connection failed; if the first run's reply was
    lost, the script runs twice with the same arguments. Simulate that: every script call
    runs twice and the caller sees the second answer."""
    await store.create_tenant("acme")
    real_call = AsyncScript.__call__

    async def twice(self: AsyncScript, keys: Any = None, args: Any = None,
                    client: Any = None) -> Any:
        await real_call(self, keys, args, client)
        return await real_call(self, keys, args, client)

    monkeypatch.setattr(AsyncScript, "__call__", twice)
    _, key = await store.create_tenant("beta")
    assert await store.tenant_for_key(key) == "beta"
    record = await store.put_adapter("beta", "a", method="lora", format="peft", config={},
                                     manifest={}, weights=b"w" * 3000,
                                     base_fingerprint="fp", uploader="u")
    assert record.version == 1
    assert [v.version for v in await store.list_versions("beta", "a")] == [1]
    binding = await store.activate("beta", "t", "a", 1, actor="x", expected_revision=0)
    assert binding.revision == 1
    assert await store.deactivate("beta", "t", actor="x", expected_revision=1) == 2
    assert [h.revision for h in await store.task_history("beta", "t")] == [2, 1]
    assert await store.change_counter() == 5  # acme, beta, put, activate, deactivate
