"""AdapterStore contract, against a real redis-server (shared; a fresh key space per test)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from typing import Any

import pytest
from redis.asyncio import Redis

from tessera.store.client import connect
from tessera.store.embedded import EmbeddedRedis, free_port
from tessera.store.errors import ConflictError, IntegrityError, NotFoundError, StoreFullError
from tessera.store.keys import Keys
from tessera.store.store import AdapterStore
from tests.store.conftest import MakeStore, scan_keys, store_settings


async def put(store: AdapterStore, tenant: str, name: str, data: bytes,
              **extra: Any) -> int:
    record = await store.put_adapter(
        tenant, name, method="lora", format="peft", config={"r": 4},
        manifest={"peft_type": "LORA"}, weights=data, base_fingerprint="base-fp",
        uploader="alice", **extra)
    return record.version


async def blob_state(redis: Redis, keys: Keys, data: bytes) -> tuple[int | None, int]:
    """(refs of the blob holding ``data`` or None when absent, number of its chunk keys)."""
    sha = hashlib.sha256(data).hexdigest()
    refs = await redis.hget(keys.blob(sha), "refs")
    chunks = await scan_keys(redis, keys.blob_chunk_pattern(sha))
    return (int(refs) if refs is not None else None), len(chunks)


@pytest.mark.parametrize(("chunk_bytes", "size"), [
    (1024, 0), (1024, 1), (1024, 1023), (1024, 1024), (1024, 1025),
    (1024, 200 * 1024 + 7),      # 201 chunks
    (4096, 3 * 4096), (65536, 300_001),
])
async def test_upload_then_get_is_bit_exact(make_store: MakeStore, redis_client: Redis,
                                            keys: Keys, chunk_bytes: int, size: int) -> None:
    store = await make_store(chunk_bytes=chunk_bytes)
    await store.create_tenant("acme")
    data = os.urandom(size)
    version = await put(store, "acme", "ada", data)
    assert await store.get_weights("acme", "ada", version) == data
    refs, chunks = await blob_state(redis_client, keys, data)
    assert (refs, chunks) == (1, -(-size // chunk_bytes))
    assert await scan_keys(redis_client, f"{keys.root}:upload:*") == []  # staging cleaned


async def test_version_records_round_trip_and_number_from_one(store: AdapterStore) -> None:
    await store.create_tenant("acme")
    made = []
    for i in range(3):
        made.append(await store.put_adapter(
            "acme", "ada", method="dora", format="tessera", config={"r": i, "alpha": 2.5},
            manifest={"tensors": {"x": [1, 2]}, "i": i}, weights=os.urandom(100 + i),
            base_fingerprint="fp", uploader="bob", metadata={"note": f"n{i}"}))
    assert [m.version for m in made] == [1, 2, 3]
    for m in made:
        assert await store.get_version("acme", "ada", m.version) == m
    assert await store.list_versions("acme", "ada") == made
    assert await store.list_adapters("acme") == ["ada"]
    with pytest.raises(NotFoundError):
        await store.get_version("acme", "ada", 4)
    with pytest.raises(NotFoundError):
        await store.get_weights("acme", "nope", 1)


async def test_identical_blobs_are_stored_once(store: AdapterStore, redis_client: Redis,
                                               keys: Keys) -> None:
    await store.create_tenant("acme")
    await store.create_tenant("other")
    data = os.urandom(10 * 1024 + 5)  # 11 chunks
    await put(store, "acme", "a", data)
    await put(store, "acme", "a", data)
    await put(store, "acme", "b", data)
    await put(store, "other", "c", data)
    await store.put_hypernet("acme", "h", config={}, manifest={}, weights=data,
                             base_fingerprint="fp", uploader="u")
    assert await blob_state(redis_client, keys, data) == (5, 11)
    assert len(await scan_keys(redis_client, f"{keys.root}:blob:*")) == 1 + 11
    assert await scan_keys(redis_client, f"{keys.root}:upload:*") == []


async def test_delete_keeps_shared_blobs_and_frees_unreferenced(
        store: AdapterStore, redis_client: Redis, keys: Keys) -> None:
    await store.create_tenant("acme")
    shared, alone = os.urandom(3000), os.urandom(2500)
    await put(store, "acme", "a", shared)   # v1
    await put(store, "acme", "a", shared)   # v2
    await put(store, "acme", "a", alone)    # v3
    await store.delete_version("acme", "a", 1)
    assert await blob_state(redis_client, keys, shared) == (1, 3)
    assert await store.get_weights("acme", "a", 2) == shared
    await store.delete_version("acme", "a", 3)
    assert await blob_state(redis_client, keys, alone) == (None, 0)
    with pytest.raises(NotFoundError):
        await store.get_weights("acme", "a", 3)
    with pytest.raises(NotFoundError):
        await store.delete_version("acme", "a", 3)
    await store.delete_version("acme", "a", 2)
    assert await blob_state(redis_client, keys, shared) == (None, 0)
    assert await store.list_adapters("acme") == []
    # numbers are never reused: a cache keyed by version can not serve stale bytes
    assert await put(store, "acme", "a", alone) == 4


async def test_bound_version_cannot_be_deleted(store: AdapterStore) -> None:
    await store.create_tenant("acme")
    await put(store, "acme", "a", b"one")
    await put(store, "acme", "a", b"two")
    await store.activate("acme", "t", "a", 1, actor="ops")
    with pytest.raises(ConflictError):
        await store.delete_version("acme", "a", 1)
    await store.activate("acme", "t", "a", 2, actor="ops")   # moves the reference
    await store.delete_version("acme", "a", 1)
    with pytest.raises(ConflictError):
        await store.delete_version("acme", "a", 2)
    await store.deactivate("acme", "t", actor="ops")
    await store.delete_version("acme", "a", 2)
    assert await store.list_versions("acme", "a") == []


async def test_activate_refuses_what_does_not_exist(store: AdapterStore) -> None:
    await store.create_tenant("acme")
    await put(store, "acme", "a", b"w")
    with pytest.raises(NotFoundError):
        await store.activate("acme", "t", "a", 2, actor="ops")
    with pytest.raises(NotFoundError):
        await store.activate("acme", "t", "zzz", 1, actor="ops")
    with pytest.raises(NotFoundError):
        await store.activate("ghost", "t", "a", 1, actor="ops")
    with pytest.raises(NotFoundError):
        await store.deactivate("acme", "t", actor="ops")
    assert await store.get_binding("acme", "t") is None
    assert await store.task_history("acme", "t") == []


async def test_compare_and_set_and_history(store: AdapterStore) -> None:
    await store.create_tenant("acme")
    await put(store, "acme", "a", b"1")
    await put(store, "acme", "b", b"2")
    first = await store.activate("acme", "t", "a", 1, actor="x", expected_revision=0)
    assert (first.adapter, first.version, first.revision) == ("a", 1, 1)
    with pytest.raises(ConflictError):
        await store.activate("acme", "t", "b", 1, actor="y", expected_revision=0)
    assert await store.get_binding("acme", "t") == first      # the loser changed nothing
    second = await store.activate("acme", "t", "b", 1, actor="y", expected_revision=1)
    assert second.revision == 2
    with pytest.raises(ConflictError):
        await store.deactivate("acme", "t", actor="z", expected_revision=1)
    assert await store.deactivate("acme", "t", actor="z", expected_revision=2) == 3
    assert await store.get_binding("acme", "t") is None
    assert await store.task_revision("acme", "t") == 3        # survives deactivation (no ABA)
    third = await store.activate("acme", "t", "a", 1, actor="w", expected_revision=3)
    assert third.revision == 4
    history = await store.task_history("acme", "t")
    assert [(h.action, h.adapter, h.version, h.revision, h.actor) for h in history] == [
        ("activate", "a", 1, 4, "w"), ("deactivate", None, None, 3, "z"),
        ("activate", "b", 1, 2, "y"), ("activate", "a", 1, 1, "x")]
    assert (history[0].previous_adapter, history[2].previous_adapter) == (None, "a")
    assert (history[1].previous_adapter, history[1].previous_version) == ("b", 1)
    assert await store.get_binding("acme", "t") == third
    assert [b.task for b in await store.list_tasks("acme")] == ["t"]


async def test_history_is_trimmed_to_the_limit(make_store: MakeStore) -> None:
    store = await make_store(history_limit=5)
    await store.create_tenant("acme")
    await put(store, "acme", "a", b"w")
    for _ in range(8):
        await store.activate("acme", "t", "a", 1, actor="ops")
    history = await store.task_history("acme", "t")
    assert [h.revision for h in history] == [8, 7, 6, 5, 4]
    assert [h.revision for h in await store.task_history("acme", "t", limit=2)] == [8, 7]


async def test_tenants_and_hashed_api_keys(store: AdapterStore, redis_client: Redis,
                                           keys: Keys) -> None:
    tenant, key = await store.create_tenant("acme")
    assert tenant.name == "acme"
    with pytest.raises(ConflictError):
        await store.create_tenant("acme")
    second = await store.add_api_key("acme")
    assert key != second
    assert await store.tenant_for_key(key) == "acme"
    assert await store.tenant_for_key(second) == "acme"
    assert await store.tenant_for_key("not-a-key") is None
    with pytest.raises(NotFoundError):
        await store.add_api_key("ghost")
    # the plaintext is nowhere in Redis; its sha256 is
    everything = b""
    for name in await scan_keys(redis_client, f"{keys.root}:*"):
        everything += name.encode()
        if await redis_client.type(name) == b"string":
            everything += await redis_client.get(name) or b""
        elif await redis_client.type(name) == b"set":
            everything += b"".join(await redis_client.smembers(name))
    assert key.encode() not in everything and second.encode() not in everything
    assert hashlib.sha256(key.encode()).hexdigest().encode() in everything
    await store.revoke_api_key("acme", key)
    assert await store.tenant_for_key(key) is None
    assert await store.tenant_for_key(second) == "acme"
    with pytest.raises(NotFoundError):
        await store.revoke_api_key("acme", key)
    await store.create_tenant("beta")
    assert [t.name for t in await store.list_tenants()] == ["acme", "beta"]
    assert (await store.get_tenant("beta")).name == "beta"


async def test_delete_tenant_refuses_while_it_owns_adapters(
        store: AdapterStore, redis_client: Redis, keys: Keys) -> None:
    _, key = await store.create_tenant("acme")
    await put(store, "acme", "a", b"w")
    await store.activate("acme", "t", "a", 1, actor="ops")
    with pytest.raises(ConflictError):
        await store.delete_tenant("acme")
    await store.deactivate("acme", "t", actor="ops")
    await store.delete_version("acme", "a", 1)
    await store.delete_tenant("acme")
    with pytest.raises(NotFoundError):
        await store.get_tenant("acme")
    with pytest.raises(NotFoundError):
        await store.delete_tenant("acme")
    assert await store.tenant_for_key(key) is None
    assert await store.list_tenants() == []
    # only the version counter (never reused numbers) and the change counter remain
    assert await scan_keys(redis_client, f"{keys.root}:*") == sorted(
        [keys.changes(), keys.adapter_seq("acme", "a")])


async def test_every_mutation_counts_and_publishes_one_event(
        store: AdapterStore, redis_client: Redis, keys: Keys) -> None:
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(keys.events())
    await pubsub.get_message(timeout=5)  # the subscribe confirmation
    _, key = await store.create_tenant("acme")
    await store.add_api_key("acme")
    await store.revoke_api_key("acme", key)
    await put(store, "acme", "a", b"w")
    await store.activate("acme", "t", "a", 1, actor="ops")
    await store.deactivate("acme", "t", actor="ops")
    await store.delete_version("acme", "a", 1)
    await store.put_hypernet("acme", "h", config={}, manifest={}, weights=b"h",
                             base_fingerprint="fp", uploader="u")
    await store.register_task("acme", "h", 1, "ner", b"e")
    await store.put_generated("acme", "h", 1, "ner", b"g")
    await store.put_generated("acme", "h", 1, "ner", b"g2")  # lost: no mutation, no event
    await store.register_task("acme", "h", 1, "ner", b"e")  # same embedding: a no-op
    with pytest.raises(ConflictError):
        await store.register_task("acme", "h", 1, "ner", b"other")  # refused: no event
    events = []
    while len(events) < 10:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
        assert message is not None, f"only {len(events)} events arrived"
        events.append(json.loads(message["data"]))
    assert await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2) is None
    await pubsub.aclose()
    assert [e["kind"] for e in events] == [
        "tenant.created", "apikey.added", "apikey.revoked", "adapter.put", "task.activated",
        "task.deactivated", "adapter.deleted", "hypernet.put", "hypernet.task_registered",
        "generated.put"]
    assert all(e["tenant"] == "acme" for e in events)
    assert (events[3]["name"], events[3]["version"]) == ("a", 1)
    assert (events[4]["name"], events[4]["version"], events[4]["revision"]) == ("t", 1, 1)
    assert (events[5]["name"], events[5]["revision"]) == ("t", 2)
    assert await store.change_counter() == 10


async def test_hypernetworks_tasks_and_generated_cache(store: AdapterStore) -> None:
    await store.create_tenant("acme")
    weights, embedding = os.urandom(5000), os.urandom(256)
    hv = await store.put_hypernet("acme", "hl", config={"t": 64}, manifest={"heads": 3},
                                  weights=weights, base_fingerprint="fp", uploader="u",
                                  metadata={"paper": "2407.01411"})
    assert hv.version == 1 and hv.tasks == ()
    assert await store.get_hypernet_weights("acme", "hl", 1) == weights
    await store.register_task("acme", "hl", 1, "ner", embedding)
    with pytest.raises(ConflictError):  # another embedding would make caches stale
        await store.register_task("acme", "hl", 1, "ner", os.urandom(256))
    await store.register_task("acme", "hl", 1, "ner", embedding)  # the same one: no-op
    with pytest.raises(NotFoundError):
        await store.register_task("acme", "hl", 2, "pos", embedding)
    assert await store.get_task_embedding("acme", "hl", 1, "ner") == embedding
    assert await store.list_hypernet_tasks("acme", "hl", 1) == ["ner"]
    assert (await store.get_hypernet("acme", "hl", 1)).tasks == ("ner",)
    assert await store.list_hypernets("acme") == ["hl"]
    assert await store.list_hypernet_versions("acme", "hl") == [1]
    assert await store.get_generated("acme", "hl", 1, "ner") is None
    with pytest.raises(NotFoundError):
        await store.put_generated("acme", "hl", 1, "pos", b"x")   # task not registered
    with pytest.raises(NotFoundError):
        await store.get_generated_weights("acme", "hl", 1, "ner")
    generated = os.urandom(3000)
    entry = await store.put_generated("acme", "hl", 1, "ner", generated)
    assert (entry.hypernet, entry.version, entry.task, entry.size) == ("hl", 1, "ner", 3000)
    assert await store.get_generated("acme", "hl", 1, "ner") == entry
    assert await store.get_generated_weights("acme", "hl", 1, "ner") == generated


async def test_generated_cache_first_writer_wins(store: AdapterStore, redis_client: Redis,
                                                 keys: Keys) -> None:
    await store.create_tenant("acme")
    await store.put_hypernet("acme", "hl", config={}, manifest={}, weights=b"w",
                             base_fingerprint="fp", uploader="u")
    await store.register_task("acme", "hl", 1, "ner", b"e")
    payloads = [os.urandom(2048 + i) for i in range(10)]
    entries = await asyncio.gather(*(store.put_generated("acme", "hl", 1, "ner", p)
                                     for p in payloads))
    assert len(set(entries)) == 1
    winner = entries[0]
    stored = await store.get_generated_weights("acme", "hl", 1, "ner")
    assert hashlib.sha256(stored).hexdigest() == winner.sha256
    for p in payloads:  # losers left no blob and no staged chunks behind
        expected = (1, -(-len(p) // 1024)) if p == stored else (None, 0)
        assert await blob_state(redis_client, keys, p) == expected
    assert await scan_keys(redis_client, f"{keys.root}:upload:*") == []


async def test_corrupted_chunk_is_an_integrity_error(store: AdapterStore,
                                                     redis_client: Redis, keys: Keys) -> None:
    await store.create_tenant("acme")
    data = os.urandom(4000)
    await put(store, "acme", "a", data)
    chunk = keys.blob_chunk(hashlib.sha256(data).hexdigest(), 2)
    original = await redis_client.get(chunk)
    assert original is not None
    await redis_client.set(chunk, bytes([original[0] ^ 1]) + original[1:])
    with pytest.raises(IntegrityError):
        await store.get_weights("acme", "a", 1)


async def test_a_full_redis_refuses_the_upload_and_keeps_nothing(tmp_path: Any) -> None:
    server = EmbeddedRedis(tmp_path / "full", port=free_port(), maxmemory="3mb")
    server.start()
    settings = store_settings(chunk_bytes=256 * 1024)
    client = connect(server.url, settings)
    keys = Keys(prefix="full")
    try:
        store = AdapterStore(client, keys, settings)
        await store.create_tenant("acme")
        small = os.urandom(1000)
        await put(store, "acme", "a", small)
        with pytest.raises(StoreFullError):
            await put(store, "acme", "a", os.urandom(6 * 1024 * 1024))
        assert [v.version for v in await store.list_versions("acme", "a")] == [1]
        assert await scan_keys(client, f"{keys.root}:upload:*") == []
        assert len(await scan_keys(client, f"{keys.root}:blob:*")) == 2  # small's meta + chunk
        assert await store.get_weights("acme", "a", 1) == small
    finally:
        await client.aclose()
        server.kill()


async def test_deleting_a_hypernet_version_frees_its_embeddings_and_generated_adapters(
        store: AdapterStore, redis_client: Redis, keys: Keys) -> None:
    await store.create_tenant("acme")
    shared, embedding, generated = os.urandom(3000), os.urandom(500), os.urandom(1500)
    await put(store, "acme", "a", shared)            # the adapter shares the weights blob
    for _ in range(2):
        await store.put_hypernet("acme", "hl", config={}, manifest={}, weights=shared,
                                 base_fingerprint="fp", uploader="u")
    await store.register_task("acme", "hl", 1, "ner", embedding)
    await store.register_task("acme", "hl", 1, "pos", embedding)
    await store.put_generated("acme", "hl", 1, "ner", generated)
    await store.register_task("acme", "hl", 2, "ner", embedding)
    assert await blob_state(redis_client, keys, embedding) == (3, 1)
    await store.delete_hypernet_version("acme", "hl", 1)
    with pytest.raises(NotFoundError):
        await store.get_hypernet("acme", "hl", 1)
    with pytest.raises(NotFoundError):
        await store.delete_hypernet_version("acme", "hl", 1)
    assert await store.get_generated("acme", "hl", 1, "ner") is None
    assert await blob_state(redis_client, keys, generated) == (None, 0)
    assert await blob_state(redis_client, keys, embedding) == (1, 1)
    assert await blob_state(redis_client, keys, shared) == (2, 3)
    assert await store.get_task_embedding("acme", "hl", 2, "ner") == embedding
    await store.delete_hypernet_version("acme", "hl", 2)
    assert await store.list_hypernets("acme") == []
    assert await blob_state(redis_client, keys, embedding) == (None, 0)
    assert await store.get_weights("acme", "a", 1) == shared
    await store.delete_version("acme", "a", 1)
    assert await blob_state(redis_client, keys, shared) == (None, 0)
    await store.delete_tenant("acme")
    assert await scan_keys(redis_client, f"{keys.root}:blob:*") == []
