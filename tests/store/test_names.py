"""Strict names on every entry point, and tenant isolation."""

from __future__ import annotations

import string
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from tessera.store.errors import InvalidNameError, NotFoundError
from tessera.store.keys import Keys
from tessera.store.names import MAX_NAME_LENGTH, check_name
from tessera.store.store import AdapterStore
from tests.store.conftest import scan_keys

BAD_NAMES: list[Any] = [
    "a/b", "../etc", "/abs", "a\\b", "a\x00b", "..", "a..b", ".hidden", "x" * 65, "",
    "a:b", "-lead", "sp ace", "tab\t", "new\nline", "é", None, 7,
]

Call = Callable[[AdapterStore, Any], Awaitable[object]]
W: dict[str, Any] = {"config": {}, "manifest": {}, "weights": b"w",
                     "base_fingerprint": "fp", "uploader": "u"}

ENTRY_POINTS: dict[str, Call] = {
    "create_tenant": lambda s, n: s.create_tenant(n),
    "add_api_key": lambda s, n: s.add_api_key(n),
    "revoke_api_key": lambda s, n: s.revoke_api_key(n, "key"),
    "get_tenant": lambda s, n: s.get_tenant(n),
    "delete_tenant": lambda s, n: s.delete_tenant(n),
    "put_adapter.tenant": lambda s, n: s.put_adapter(n, "a", method="lora", format="peft",
                                                     **W),
    "put_adapter.name": lambda s, n: s.put_adapter("acme", n, method="lora", format="peft",
                                                   **W),
    "put_adapter.method": lambda s, n: s.put_adapter("acme", "a", method=n, format="peft",
                                                     **W),
    "put_adapter.format": lambda s, n: s.put_adapter("acme", "a", method="lora", format=n,
                                                     **W),
    "get_version.tenant": lambda s, n: s.get_version(n, "a", 1),
    "get_version.name": lambda s, n: s.get_version("acme", n, 1),
    "get_weights.tenant": lambda s, n: s.get_weights(n, "a", 1),
    "get_weights.name": lambda s, n: s.get_weights("acme", n, 1),
    "list_adapters": lambda s, n: s.list_adapters(n),
    "list_versions.tenant": lambda s, n: s.list_versions(n, "a"),
    "list_versions.name": lambda s, n: s.list_versions("acme", n),
    "delete_version.tenant": lambda s, n: s.delete_version(n, "a", 1),
    "delete_version.name": lambda s, n: s.delete_version("acme", n, 1),
    "activate.tenant": lambda s, n: s.activate(n, "t", "a", 1, actor="x"),
    "activate.task": lambda s, n: s.activate("acme", n, "a", 1, actor="x"),
    "activate.adapter": lambda s, n: s.activate("acme", "t", n, 1, actor="x"),
    "deactivate.tenant": lambda s, n: s.deactivate(n, "t", actor="x"),
    "deactivate.task": lambda s, n: s.deactivate("acme", n, actor="x"),
    "get_binding.tenant": lambda s, n: s.get_binding(n, "t"),
    "get_binding.task": lambda s, n: s.get_binding("acme", n),
    "task_revision.task": lambda s, n: s.task_revision("acme", n),
    "task_history.tenant": lambda s, n: s.task_history(n, "t", 10),
    "task_history.task": lambda s, n: s.task_history("acme", n, 10),
    "list_tasks": lambda s, n: s.list_tasks(n),
    "put_hypernet.tenant": lambda s, n: s.put_hypernet(n, "h", **W),
    "put_hypernet.name": lambda s, n: s.put_hypernet("acme", n, **W),
    "get_hypernet.name": lambda s, n: s.get_hypernet("acme", n, 1),
    "get_hypernet_weights.name": lambda s, n: s.get_hypernet_weights("acme", n, 1),
    "list_hypernets": lambda s, n: s.list_hypernets(n),
    "delete_hypernet_version.tenant": lambda s, n: s.delete_hypernet_version(n, "h", 1),
    "delete_hypernet_version.name": lambda s, n: s.delete_hypernet_version("acme", n, 1),
    "list_hypernet_versions.name": lambda s, n: s.list_hypernet_versions("acme", n),
    "register_task.tenant": lambda s, n: s.register_task(n, "h", 1, "r", b"e"),
    "register_task.name": lambda s, n: s.register_task("acme", n, 1, "r", b"e"),
    "register_task.task": lambda s, n: s.register_task("acme", "h", 1, n, b"e"),
    "get_task_embedding.tenant": lambda s, n: s.get_task_embedding(n, "h", 1, "r"),
    "get_task_embedding.name": lambda s, n: s.get_task_embedding("acme", n, 1, "r"),
    "get_task_embedding.task": lambda s, n: s.get_task_embedding("acme", "h", 1, n),
    "list_hypernet_tasks.name": lambda s, n: s.list_hypernet_tasks("acme", n, 1),
    "get_generated.tenant": lambda s, n: s.get_generated(n, "h", 1, "r"),
    "get_generated.name": lambda s, n: s.get_generated("acme", n, 1, "r"),
    "get_generated.task": lambda s, n: s.get_generated("acme", "h", 1, n),
    "put_generated.tenant": lambda s, n: s.put_generated(n, "h", 1, "r", b"g"),
    "put_generated.name": lambda s, n: s.put_generated("acme", n, 1, "r", b"g"),
    "put_generated.task": lambda s, n: s.put_generated("acme", "h", 1, n, b"g"),
    "get_generated_weights.task": lambda s, n: s.get_generated_weights("acme", "h", 1, n),
}


async def populate(store: AdapterStore) -> None:
    await store.create_tenant("acme")
    await store.put_adapter("acme", "a", method="lora", format="peft", **W)
    await store.activate("acme", "t", "a", 1, actor="x")
    await store.put_hypernet("acme", "h", **W)
    await store.register_task("acme", "h", 1, "r", b"e")


async def snapshot(redis: Redis, keys: Keys) -> list[tuple[str, bytes | None]]:
    return [(k, await redis.dump(k)) for k in await scan_keys(redis, f"{keys.root}:*")]


@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
async def test_every_entry_point_refuses_a_bad_name_and_touches_nothing(
        store: AdapterStore, redis_client: Redis, keys: Keys, bad: Any) -> None:
    await populate(store)
    before = await snapshot(redis_client, keys)
    accepted = []
    for what, call in ENTRY_POINTS.items():
        try:
            await call(store, bad)
        except InvalidNameError:
            continue
        accepted.append(what)
    assert accepted == [], f"{bad!r} got through {accepted}"
    assert await snapshot(redis_client, keys) == before


async def test_names_at_the_limits_work(store: AdapterStore) -> None:
    longest = "x" * MAX_NAME_LENGTH
    await store.create_tenant("T0.a-b_c")
    record = await store.put_adapter("T0.a-b_c", longest, method="lora", format="peft", **W)
    assert record.name == longest
    await store.activate("T0.a-b_c", "9", longest, 1, actor="x")
    assert await store.list_adapters("T0.a-b_c") == [longest]


@given(st.text(max_size=80))
def test_accepted_names_are_safe_as_key_and_path_parts(value: str) -> None:
    try:
        check_name(value)
    except InvalidNameError:
        return
    allowed = set(string.ascii_letters + string.digits + "._-")
    assert 1 <= len(value) <= MAX_NAME_LENGTH
    assert set(value) <= allowed
    assert ".." not in value and value[0] not in ".-"


@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True))
def test_pattern_names_are_accepted_unless_dot_dot(value: str) -> None:
    if ".." in value:
        with pytest.raises(InvalidNameError):
            check_name(value)
    else:
        assert check_name(value) == value


async def test_tenants_cannot_reach_each_others_objects(make_store: Any) -> None:
    store: AdapterStore = await make_store()
    await populate(store)
    await store.put_generated("acme", "h", 1, "r", b"g")
    _, key_a = await store.create_tenant("acme2")
    await store.create_tenant("bob")
    binding = await store.get_binding("acme", "t")

    not_found: dict[str, Call] = {
        "get_version": lambda s, t: s.get_version(t, "a", 1),
        "get_weights": lambda s, t: s.get_weights(t, "a", 1),
        "delete_version": lambda s, t: s.delete_version(t, "a", 1),
        "activate": lambda s, t: s.activate(t, "t", "a", 1, actor="x"),
        "deactivate": lambda s, t: s.deactivate(t, "t", actor="x"),
        "get_hypernet": lambda s, t: s.get_hypernet(t, "h", 1),
        "get_hypernet_weights": lambda s, t: s.get_hypernet_weights(t, "h", 1),
        "delete_hypernet_version": lambda s, t: s.delete_hypernet_version(t, "h", 1),
        "register_task": lambda s, t: s.register_task(t, "h", 1, "r2", b"e"),
        "get_task_embedding": lambda s, t: s.get_task_embedding(t, "h", 1, "r"),
        "put_generated": lambda s, t: s.put_generated(t, "h", 1, "r", b"x"),
        "get_generated_weights": lambda s, t: s.get_generated_weights(t, "h", 1, "r"),
        "revoke_api_key": lambda s, t: s.revoke_api_key(t, key_a),
    }
    leaks = []
    for what, call in not_found.items():
        for tenant in ("bob", "nobody"):   # not yours == unknown: both NotFoundError
            try:
                await call(store, tenant)
            except NotFoundError:
                continue
            leaks.append((what, tenant))
    assert leaks == []
    assert await store.list_adapters("bob") == []
    assert await store.list_versions("bob", "a") == []
    assert await store.list_tasks("bob") == []
    assert await store.get_binding("bob", "t") is None
    assert await store.task_history("bob", "t") == []
    assert await store.list_hypernets("bob") == []
    assert await store.list_hypernet_tasks("bob", "h", 1) == []
    assert await store.get_generated("bob", "h", 1, "r") is None
    # tenant A is untouched
    assert await store.get_binding("acme", "t") == binding
    assert [v.version for v in await store.list_versions("acme", "a")] == [1]
    assert await store.tenant_for_key(key_a) == "acme2"
    assert await store.get_generated_weights("acme", "h", 1, "r") == b"g"
