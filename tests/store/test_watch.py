"""Two replicas on one real redis-server: changes reach the other one by pub/sub, and by the
periodic version check when its pub/sub connection is cut."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable

import pytest
from redis.asyncio import Redis

from tessera.store.client import connect
from tessera.store.embedded import EmbeddedRedis
from tessera.store.errors import NotFoundError
from tessera.store.keys import Keys
from tessera.store.models import TASK_ACTIVATED
from tessera.store.settings import StoreSettings
from tessera.store.watch import ChangeEvent, ChangeWatcher
from tests.store.replicas import ADAPTER, TASK, EventLog, replica, seed


def activated(version: int) -> Callable[[ChangeEvent], bool]:
    return lambda e: e.kind == TASK_ACTIVATED and e.name == TASK and e.version == version


async def test_other_replica_sees_activation_via_pubsub(redis_server: EmbeddedRedis,
                                                        keys: Keys) -> None:
    # a poll interval far longer than the wait below: only pub/sub can deliver in time
    settings = StoreSettings(redis_url=redis_server.url, poll_interval_s=120)
    async with replica(redis_server.url, keys, settings) as a, \
            replica(redis_server.url, keys, settings) as b:
        await seed(a)
        assert (await b.resolve("acme", TASK)).version == 1      # b caches version 1
        log = EventLog(b.watcher)
        await a.activate("acme", TASK, ADAPTER, 2, actor="ops")
        event = await log.wait(activated(2), timeout_s=20)
        assert (event.source, event.tenant, event.revision) == ("pubsub", "acme", 2)
        assert (await b.resolve("acme", TASK)).version == 2
        assert b.watcher.resyncs == 1                             # the startup one only


async def test_cut_pubsub_connection_still_converges_within_interval(
        redis_server: EmbeddedRedis, keys: Keys) -> None:
    interval = 1.0
    settings = StoreSettings(redis_url=redis_server.url, poll_interval_s=interval)
    admin = Redis.from_url(redis_server.url)
    try:
        async with replica(redis_server.url, keys, settings) as a, \
                replica(redis_server.url, keys, settings) as b:
            await seed(a)
            assert (await b.resolve("acme", TASK)).version == 1
            log = EventLog(b.watcher)
            subscriptions = b.watcher.subscriptions
            assert await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
            await a.activate("acme", TASK, ADAPTER, 2, actor="ops")
            changed = time.monotonic()
            # whichever comes first: the message (if b re-subscribed before the publish)
            # or the version check's resync (if it did not)
            await log.wait(lambda e: e.is_resync or activated(2)(e))
            assert (await b.resolve("acme", TASK)).version == 2
            assert time.monotonic() - changed <= interval
            assert b.watcher.subscriptions > subscriptions        # it re-subscribed
    finally:
        await admin.aclose()


async def test_pubsub_refused_for_good_converges_by_periodic_check(
        redis_server: EmbeddedRedis, keys: Keys) -> None:
    """b's ACL user loses channel access: Redis drops its subscription and refuses a new
    one, so only the periodic version check can tell b about the activation."""
    interval = 1.0
    user, password = f"b{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    admin = Redis.from_url(redis_server.url)
    await admin.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "&*",
                                "+@all")
    b_url = f"redis://{user}:{password}@127.0.0.1:{redis_server.port}/0"
    settings = StoreSettings(redis_url=redis_server.url, poll_interval_s=interval)
    try:
        async with replica(redis_server.url, keys, settings) as a, \
                replica(b_url, keys, settings) as b:
            await seed(a)
            assert (await b.resolve("acme", TASK)).version == 1
            log = EventLog(b.watcher)
            await admin.execute_command("ACL", "SETUSER", user, "resetchannels")
            await a.activate("acme", TASK, ADAPTER, 2, actor="ops")
            changed = time.monotonic()
            resync = await log.wait(lambda e: e.is_resync)
            assert (await b.resolve("acme", TASK)).version == 2
            assert time.monotonic() - changed <= interval
            assert resync.source == "check"
            assert not any(activated(2)(e) for e in log.events)   # pub/sub never said so
    finally:
        await admin.execute_command("ACL", "DELUSER", user)
        await admin.aclose()


async def test_version_check_flags_exactly_the_changes_pubsub_missed(
        redis_server: EmbeddedRedis, keys: Keys) -> None:
    settings = StoreSettings(redis_url=redis_server.url, poll_interval_s=120)
    redis = connect(redis_server.url, settings)
    watcher = ChangeWatcher(redis, keys, settings)
    log = EventLog(watcher)
    try:
        assert await watcher.start()
        assert [e.reason for e in log.events] == ["startup"]
        for n in range(3):                       # published changes: no resync
            async with redis.pipeline(transaction=True) as pipe:
                pipe.incr(keys.changes())
                pipe.publish(keys.events(), json.dumps({"kind": TASK_ACTIVATED,
                                                        "tenant": "acme", "name": TASK,
                                                        "version": n, "revision": n}))
                await pipe.execute()
        await watcher.check_now()
        assert watcher.resyncs == 1
        assert [e.source for e in log.events[1:]] == ["pubsub"] * 3
        await redis.incr(keys.changes())          # a change whose message was lost
        await watcher.check_now()
        assert watcher.resyncs == 2
        assert (log.events[-1].kind, log.events[-1].reason) == ("resync", "missed")
        await watcher.check_now()                 # and only once
        assert watcher.resyncs == 2
    finally:
        await watcher.stop()
        await redis.aclose()


async def test_without_pubsub_every_counter_move_is_a_resync(redis_server: EmbeddedRedis,
                                                             keys: Keys) -> None:
    settings = StoreSettings(redis_url=redis_server.url, poll_interval_s=120)
    redis = connect(redis_server.url, settings)
    watcher = ChangeWatcher(redis, keys, settings, subscribe=False)
    try:
        assert await watcher.start()
        await watcher.check_now()
        assert watcher.resyncs == 1               # startup
        await redis.incr(keys.changes())
        await watcher.check_now()
        assert watcher.resyncs == 2
        assert watcher.subscriptions == 0
    finally:
        await watcher.stop()
        await redis.aclose()


async def test_listener_errors_are_contained(redis_server: EmbeddedRedis, keys: Keys) -> None:
    settings = StoreSettings(redis_url=redis_server.url, poll_interval_s=120)
    redis = connect(redis_server.url, settings)
    watcher = ChangeWatcher(redis, keys, settings)

    def broken(_: object) -> None:
        raise RuntimeError("listener bug")

    watcher.add_listener(broken)
    log = EventLog(watcher)                       # registered after the broken one
    try:
        assert await watcher.start()
        await redis.publish(keys.events(), b"not json")
        await redis.publish(keys.events(), json.dumps({"kind": "adapter.put"}))
        await log.wait(lambda e: e.kind == "adapter.put")
        assert watcher.running
    finally:
        await watcher.stop()
        await redis.aclose()
    assert not watcher.running


async def test_revoked_key_and_deactivation_reach_the_other_replica(
        redis_server: EmbeddedRedis, keys: Keys) -> None:
    settings = StoreSettings(redis_url=redis_server.url, poll_interval_s=120)
    async with replica(redis_server.url, keys, settings) as a, \
            replica(redis_server.url, keys, settings) as b:
        api_key = await seed(a)
        assert await b.tenant_for_key(api_key) == "acme"
        assert (await b.resolve("acme", TASK)).version == 1
        log = EventLog(b.watcher)
        await a.store.revoke_api_key("acme", api_key)
        await a.deactivate("acme", TASK, actor="ops")
        await log.wait(lambda e: e.kind == "task.deactivated")
        assert await b.tenant_for_key(api_key) is None
        with pytest.raises(NotFoundError):
            await b.resolve("acme", TASK)
