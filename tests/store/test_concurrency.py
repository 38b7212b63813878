"""Concurrent writers and readers on separate connections to one real redis-server."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random

import pytest
from redis.asyncio import Redis

from tessera.store.blobs import Blobs
from tessera.store.errors import ConflictError, NotFoundError
from tessera.store.keys import Keys
from tessera.store.models import Binding
from tessera.store.store import AdapterStore
from tests.store.conftest import MakeStore, scan_keys


async def put(store: AdapterStore, name: str, data: bytes) -> int:
    record = await store.put_adapter("acme", name, method="lora", format="peft", config={},
                                     manifest={}, weights=data, base_fingerprint="fp",
                                     uploader="u")
    return record.version


async def test_50_concurrent_activates_one_wins_and_readers_never_see_a_mix(
        make_store: MakeStore, redis_client: Redis, keys: Keys) -> None:
    setup = await make_store()
    await setup.create_tenant("acme")
    targets = []
    for name in ("a", "b"):
        for _ in range(25):
            targets.append((name, await put(setup, name, os.urandom(64))))
    writers = [await make_store() for _ in targets]     # one connection pool each
    readers = [await make_store() for _ in range(4)]
    start, done = asyncio.Event(), asyncio.Event()
    seen: list[Binding] = []

    async def write(store: AdapterStore, adapter: str, version: int, i: int) -> Binding:
        await start.wait()
        return await store.activate("acme", "task", adapter, version, actor=f"w{i}")

    async def read(store: AdapterStore) -> None:
        await start.wait()
        while not done.is_set():
            binding = await store.get_binding("acme", "task")
            if binding is not None:
                seen.append(binding)

    reading = [asyncio.create_task(read(r)) for r in readers]
    writing = asyncio.gather(*(write(w, a, v, i)
                               for i, (w, (a, v)) in enumerate(zip(writers, targets,
                                                                   strict=True))))
    start.set()
    results = await writing
    done.set()
    await asyncio.gather(*reading)

    history = await setup.task_history("acme", "task")
    assert len(history) == 50
    assert sorted(h.revision for h in history) == list(range(1, 51))
    assert sorted((h.adapter, h.version) for h in history) == sorted(targets)
    assert sorted(r.revision for r in results) == list(range(1, 51))
    final = await setup.get_binding("acme", "task")
    assert final is not None and (final.adapter, final.version) in targets
    assert (final.adapter, final.version, final.revision) == (
        history[0].adapter, history[0].version, 50)
    # every binding any reader saw is complete and is exactly one recorded state
    recorded = {(h.adapter, h.version, h.revision, h.actor) for h in history}
    assert seen, "the readers never observed a binding"
    for b in seen:
        assert (b.adapter, b.version, b.revision, b.actor) in recorded
    # each history entry's "previous" is the entry before it: one serial order
    by_revision = {h.revision: h for h in history}
    for rev in range(2, 51):
        assert (by_revision[rev].previous_adapter, by_revision[rev].previous_version) == (
            by_revision[rev - 1].adapter, by_revision[rev - 1].version)
    # the bound-version counts followed: only the final version is protected
    assert await redis_client.hgetall(keys.task_refs("acme")) == {
        keys.binding_ref(final.adapter, final.version).encode(): b"1"}
    for adapter, version in targets:
        if (adapter, version) != (final.adapter, final.version):
            await setup.delete_version("acme", adapter, version)
    try:
        await setup.delete_version("acme", final.adapter, final.version)
    except ConflictError:
        pass
    else:
        raise AssertionError("the bound version was deleted")


async def test_concurrent_uploads_of_one_name_get_distinct_consecutive_versions(
        make_store: MakeStore) -> None:
    setup = await make_store()
    await setup.create_tenant("acme")
    stores = [await make_store() for _ in range(20)]
    payloads = [os.urandom(3000 + i) for i in range(20)]
    versions = await asyncio.gather(*(put(s, "a", p)
                                      for s, p in zip(stores, payloads, strict=True)))
    assert sorted(versions) == list(range(1, 21))
    for version, payload in zip(versions, payloads, strict=True):
        assert await setup.get_weights("acme", "a", version) == payload


async def test_upload_racing_delete_of_the_same_blob_never_dangles(
        make_store: MakeStore, redis_client: Redis, keys: Keys) -> None:
    """Uploads of bytes X race deletes of other versions holding X (the blob's last
    reference keeps being dropped and re-created). Afterwards every surviving version
    reads back, and the blob's refcount equals the number of versions using it."""
    setup = await make_store()
    await setup.create_tenant("acme")
    data = os.urandom(5 * 1024 + 1)
    sha = hashlib.sha256(data).hexdigest()
    uploader, deleter = await make_store(), await make_store()
    rng = random.Random(7)
    deleted: set[int] = set()

    async def uploads() -> list[int]:
        return [await put(uploader, "a", data) for _ in range(60)]

    async def deletes(stop: asyncio.Event) -> None:
        while not stop.is_set():
            live = [v.version for v in await deleter.list_versions("acme", "a")]
            if not live:
                await asyncio.sleep(0)  # yield to the uploader; no timing is relied on
                continue
            victim = rng.choice(live)
            try:
                await deleter.delete_version("acme", "a", victim)
                deleted.add(victim)
            except NotFoundError:
                pass

    stop = asyncio.Event()
    deleting = asyncio.create_task(deletes(stop))
    made = await uploads()
    stop.set()
    await deleting
    assert made == list(range(1, 61))
    assert deleted, "the deleter never ran"
    survivors = [v.version for v in await setup.list_versions("acme", "a")]
    assert survivors == sorted(set(made) - deleted)
    for version in survivors:
        assert await setup.get_weights("acme", "a", version) == data
    refs = await redis_client.hget(keys.blob(sha), "refs")
    chunks = await scan_keys(redis_client, keys.blob_chunk_pattern(sha))
    if survivors:
        assert refs is not None and int(refs) == len(survivors)
        assert len(chunks) == 6
    else:
        assert refs is None and chunks == []
    assert await scan_keys(redis_client, f"{keys.root}:upload:*") == []


async def test_upload_that_saw_the_blob_then_lost_it_to_a_delete_stages_it_again(
        make_store: MakeStore, redis_client: Redis, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The race made deterministic: the uploader finds the blob stored (so it skips
    staging), then, before its commit, a delete frees that blob. The commit script must
    notice (NEED_DATA) and the uploader stage the bytes -- not reference a missing blob."""
    uploader, deleter = await make_store(), await make_store()
    await uploader.create_tenant("acme")
    data = os.urandom(5 * 1024 + 1)
    sha = hashlib.sha256(data).hexdigest()
    await put(uploader, "a", data)
    real_exists = Blobs.exists
    raced: list[bool] = []

    async def exists_then_lose_it(self: Blobs, sha256: str) -> bool:
        found = await real_exists(self, sha256)
        if not raced:
            await deleter.delete_version("acme", "a", 1)       # frees the last reference
            raced.append(await real_exists(self, sha256))
        return found

    monkeypatch.setattr(Blobs, "exists", exists_then_lose_it)
    assert await put(uploader, "a", data) == 2
    assert raced == [False]
    assert await uploader.get_weights("acme", "a", 2) == data
    assert await redis_client.hget(keys.blob(sha), "refs") == b"1"
    assert len(await scan_keys(redis_client, keys.blob_chunk_pattern(sha))) == 6
