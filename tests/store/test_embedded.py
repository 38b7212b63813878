"""open_store: the embedded redis-server tessera owns, and external URLs it only connects to."""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from store.embedded import EmbeddedRedis, free_port
from store.errors import StoreUnavailableError
from store.keys import Keys
from store.open import open_store, redact_url
from store.settings import StoreSettings
from tests.store.replicas import ADAPTER, TASK, CountingDecoder, seed, weights_of


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # short path: unix socket paths are limited to ~104 bytes; pytest's tmp_path can be long
    with tempfile.TemporaryDirectory(prefix="tsr-") as tmp:
        yield Path(tmp) / "data"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def config(redis: Redis, name: str) -> str:
    raw = await redis.config_get(name)
    value = raw.get(name.encode(), raw.get(name))
    return value.decode() if isinstance(value, bytes) else str(value)


async def test_no_url_starts_owned_unix_socket_server_with_aof(data_dir: Path) -> None:
    settings = StoreSettings(redis_url=None, data_dir=data_dir, appendfsync="always")
    async with await open_store(settings) as handle:
        assert handle.embedded is not None
        pid = handle.embedded.pid
        assert pid is not None and alive(pid)
        assert handle.url.startswith("unix://")
        assert (data_dir / "redis.sock").is_socket()
        assert await config(handle.redis, "port") == "0"            # no TCP at all
        assert await config(handle.redis, "appendonly") == "yes"
        assert await config(handle.redis, "appendfsync") == "always"
        assert await config(handle.redis, "maxmemory-policy") == "noeviction"
        assert Path(await config(handle.redis, "dir")) == data_dir.resolve()
        await handle.redis.set(handle.keys.changes(), 41)
        await handle.redis.incr(handle.keys.changes())
    assert not alive(pid)                                           # stopped on exit
    assert not (data_dir / "redis.sock").exists()

    async with await open_store(settings) as again:                 # same data dir
        assert again.embedded is not None and again.embedded.pid != pid
        assert await again.redis.get(again.keys.changes()) == b"42"  # survived stop/start


async def test_url_connects_without_starting_a_server(redis_server: EmbeddedRedis,
                                                      data_dir: Path) -> None:
    settings = StoreSettings(redis_url=redis_server.url, data_dir=data_dir,
                             key_prefix=f"t{uuid.uuid4().hex[:8]}")
    async with await open_store(settings) as handle:
        assert handle.embedded is None
        await handle.redis.set(handle.keys.changes(), 7)
    assert not data_dir.exists()                                    # nothing was started
    witness = Redis.from_url(redis_server.url)
    try:
        assert await witness.get(handle.keys.changes()) == b"7"     # it was that server
    finally:
        await witness.aclose()


async def test_acl_url_works_and_password_never_logged(redis_server: EmbeddedRedis,
                                                       data_dir: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    user, password = f"u{uuid.uuid4().hex[:8]}", f"pw{uuid.uuid4().hex}"
    prefix = f"t{uuid.uuid4().hex[:8]}"
    admin = Redis.from_url(redis_server.url)
    # the least privilege docs/store.md documents for an external Redis
    await admin.execute_command(
        "ACL", "SETUSER", user, "on", f">{password}", f"~{prefix}:*",
        f"&{Keys(prefix).events()}", "+@read", "+@write", "+@scripting", "+@pubsub",
        "+@transaction", "+ping")
    port = redis_server.port
    try:
        caplog.set_level(logging.DEBUG)
        good = StoreSettings(redis_url=f"redis://{user}:{password}@127.0.0.1:{port}/0",
                             data_dir=data_dir, key_prefix=prefix, poll_interval_s=60)
        async with await open_store(good) as handle, \
                handle.cached_store(lambda d: d.nbytes) as cached:
            assert handle.embedded is None
            assert f"user={user} ".encode() in await admin.execute_command("CLIENT", "LIST")
            await seed(cached)                     # every kind of write the store does
            assert (await cached.resolve("acme", TASK)).version == 1
            decoded = await cached.load_adapter("acme", ADAPTER, 2, CountingDecoder())
            assert decoded.data == weights_of(2)
            await cached.delete_version("acme", ADAPTER, 2)
            await cached.watcher.check_now()
            assert cached.watcher.subscriptions == 1 and cached.watcher.checks >= 2
        bad = StoreSettings(redis_url=f"redis://{user}:wrong-{password}@127.0.0.1:{port}/0",
                            data_dir=data_dir)
        with pytest.raises(StoreUnavailableError, match="credentials") as err:
            await open_store(bad)
        assert password not in str(err.value)
        logged = " ".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
        assert "external Redis" in logged
        assert password not in logged
    finally:
        await admin.execute_command("ACL", "DELUSER", user)
        await admin.aclose()


async def test_unreachable_url_opens_and_reports_later(data_dir: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Startup does not depend on Redis being up; calls fail with the typed error."""
    url = f"redis://127.0.0.1:{free_port()}/0"                  # nothing listens there
    async with await open_store(StoreSettings(redis_url=url, data_dir=data_dir)) as handle:
        assert handle.embedded is None
        assert "unreachable at startup" in caplog.text
        with pytest.raises(StoreUnavailableError):
            await handle.adapter_store().change_counter()


def test_redact_url() -> None:
    assert redact_url("redis://app:s3cret@db:6380/1") == "redis://app:***@db:6380/1"
    assert redact_url("rediss://:s3cret@db/0") == "rediss://:***@db/0"
    assert redact_url("redis://db:6379/0") == "redis://db:6379/0"


async def test_missing_binary_names_how_to_install(data_dir: Path) -> None:
    settings = StoreSettings(redis_url=None, data_dir=data_dir,
                             redis_server_binary="tessera-no-such-redis-server")
    with pytest.raises(StoreUnavailableError, match="apt-get install redis-server") as err:
        await open_store(settings)
    assert "brew install redis" in str(err.value)
    # the failed start released the data-dir lock: a correct configuration now opens
    async with await open_store(StoreSettings(redis_url=None, data_dir=data_dir)) as handle:
        assert handle.embedded is not None


async def test_second_process_on_one_data_dir_is_refused(data_dir: Path) -> None:
    settings = StoreSettings(redis_url=None, data_dir=data_dir)
    async with await open_store(settings) as handle:
        with pytest.raises(StoreUnavailableError, match="in use by another tessera"):
            await open_store(settings)
        assert await handle.redis.ping()                            # the owner is unharmed


async def test_server_left_by_a_dead_tessera_is_replaced_and_data_kept(data_dir: Path) -> None:
    orphan = EmbeddedRedis(data_dir, appendfsync="always")           # same socket, same AOF
    orphan.start()
    orphan_pid = orphan.pid
    assert orphan_pid is not None
    client = Redis.from_url(orphan.url)
    await client.set("tessera-orphan-check", b"kept")
    await client.aclose()
    try:
        async with await open_store(StoreSettings(redis_url=None, data_dir=data_dir)) as h:
            assert h.embedded is not None and h.embedded.pid != orphan_pid
            assert orphan.process is not None and orphan.process.wait(timeout=10) == 0
            assert await h.redis.get("tessera-orphan-check") == b"kept"
    finally:
        orphan.kill()


async def test_overlong_socket_path_is_a_clear_error(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with pytest.raises(StoreUnavailableError, match="too long"):
        await open_store(StoreSettings(redis_url=None, data_dir=deep))
