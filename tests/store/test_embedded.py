"""open_store: the embedded redis-server tessera owns (and restarts when it dies), and
external URLs it only connects to."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from tessera.store.embedded import EmbeddedRedis, EmbeddedStats, free_port
from tessera.store.errors import StoreUnavailableError
from tessera.store.keys import Keys
from tessera.store.open import StoreHandle, open_store, redact_url
from tessera.store.settings import StoreSettings
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


# --- supervision: a killed embedded redis-server does not stay dead ------------------------

RESTARTED = "store: embedded redis-server restarted"
RESTART_FAILED = "store: embedded redis-server restart failed"


def supervised(data_dir: Path, **overrides: object) -> StoreSettings:
    """Embedded store settings that notice a death quickly; every write durable (AOF
    ``always``), so what a call confirmed before a ``kill -9`` must be there after it."""
    values: dict[str, object] = {
        "redis_url": None, "data_dir": data_dir, "appendfsync": "always",
        "embedded_watch_interval_s": 0.05, "embedded_restart_backoff_s": 0.05,
        "embedded_restart_backoff_cap_s": 2.0}
    values.update(overrides)
    return StoreSettings(**values)  # type: ignore[arg-type]


def stats(handle: StoreHandle) -> EmbeddedStats:
    current = handle.embedded_stats()
    assert current is not None
    return current


async def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0,
                     poll_s: float = 0.01) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not true within {timeout_s} s"
        await asyncio.sleep(poll_s)


def kill9(handle: StoreHandle) -> int:
    assert handle.embedded is not None and handle.embedded.pid is not None
    pid = handle.embedded.pid
    os.kill(pid, signal.SIGKILL)
    return pid


def answers(sock_path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            sock.connect(str(sock_path))
            return True
    except OSError:
        return False


def records(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == message]


async def test_killed_server_is_restarted_on_its_data_and_the_client_reconnects(
        data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tessera.store.embedded")
    # a restart delay long enough to see the outage from here
    async with await open_store(supervised(data_dir, embedded_restart_backoff_s=0.3)) as handle:
        assert handle.embedded is not None
        store = handle.adapter_store()
        _, key = await store.create_tenant("acme")                   # confirmed = in the AOF
        assert stats(handle) == EmbeddedStats(up=True, restarts=0, restart_failures=0)

        old_pid = kill9(handle)
        await wait_until(lambda: not stats(handle).up)               # down, and reported so
        await wait_until(lambda: stats(handle).up, timeout_s=5)      # ... and back
        assert stats(handle) == EmbeddedStats(up=True, restarts=1, restart_failures=0)
        new_pid = handle.embedded.pid
        assert new_pid is not None and new_pid != old_pid and alive(new_pid)
        assert not alive(old_pid)

        # the same client, never recreated: its pool drops the dead connection and redials
        assert await store.tenant_for_key(key) == "acme"             # survived the kill -9
        await store.create_tenant("globex")                         # writes work again
        assert sorted(t.name for t in await store.list_tenants()) == ["acme", "globex"]
        assert Path(await config(handle.redis, "dir")) == data_dir.resolve()

        (restarted,) = records(caplog, RESTARTED)                  # structured, not printed
        assert restarted.__dict__["pid"] == new_pid
        assert restarted.__dict__["restarts"] == 1
        assert restarted.__dict__["delay_s"] == pytest.approx(0.3)
    assert not alive(new_pid)                                        # close stops the new one


async def test_close_stops_the_server_for_good(data_dir: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    handle = await open_store(supervised(data_dir))
    assert handle.embedded is not None and handle.embedded.pid is not None
    pid = handle.embedded.pid
    await handle.close()
    assert not alive(pid)
    await asyncio.sleep(0.5)                    # ten watch intervals: nothing comes back
    assert handle.embedded.process is None
    assert not (data_dir / "redis.sock").exists()
    assert stats(handle).restarts == 0 and not stats(handle).up
    assert not records(caplog, RESTARTED)
    async with await open_store(supervised(data_dir)) as again:   # lock released, data dir free
        assert await again.redis.ping()


@pytest.mark.parametrize("moment", ["backoff", "starting"])
async def test_close_during_a_restart_leaves_no_server_behind(data_dir: Path,
                                                              moment: str) -> None:
    """``close()`` racing the supervisor: while it waits out the backoff, and while a start
    runs in its worker thread (made slow here). Either way the server ends stopped."""
    backoff = 30.0 if moment == "backoff" else 0.01
    handle = await open_store(supervised(data_dir, embedded_restart_backoff_s=backoff,
                                         embedded_restart_backoff_cap_s=backoff))
    server = handle.embedded
    assert server is not None
    entered = asyncio.Event()
    loop = asyncio.get_running_loop()
    real_start = server.start
    started: list[int | None] = []

    def slow_start(timeout_s: float = 10.0) -> None:
        loop.call_soon_threadsafe(entered.set)
        time.sleep(0.5)
        real_start(timeout_s)
        started.append(server.pid)

    server.start = slow_start  # type: ignore[method-assign]
    old_pid = kill9(handle)
    await wait_until(lambda: not stats(handle).up)
    if moment == "starting":
        await asyncio.wait_for(entered.wait(), 5)
    await handle.close()                                  # waits for the start, then stops it
    assert server.process is None and not alive(old_pid)
    if moment == "starting":                              # the start did finish: then stopped
        (pid,) = started
        assert pid is not None and pid != old_pid and not alive(pid)
    else:
        assert not entered.is_set() and not started       # cancelled before any start
    await asyncio.sleep(0.3)
    assert not answers(data_dir / "redis.sock")           # nothing serves the data dir
    assert stats(handle) == EmbeddedStats(up=False, restarts=0, restart_failures=0)


async def test_a_server_that_cannot_start_is_retried_with_growing_delays(
        data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tessera.store.embedded")
    settings = supervised(data_dir, embedded_restart_backoff_s=0.1,
                          embedded_restart_backoff_cap_s=0.8)
    async with await open_store(settings) as handle:
        assert handle.embedded is not None
        await handle.redis.set("tessera-backoff-check", b"kept")
        handle.embedded.binary = "false"       # exits at once, as a broken redis-server would
        killed_at = time.time()
        kill9(handle)
        await wait_until(lambda: stats(handle).restart_failures >= 5, timeout_s=10)
        failed = records(caplog, RESTART_FAILED)
        assert len(failed) == stats(handle).restart_failures
        delays = [r.__dict__["delay_s"] for r in failed[:5]]
        assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 0.8])  # doubling, capped
        assert [r.__dict__["attempt"] for r in failed[:5]] == [1, 2, 3, 4, 5]
        assert "exited at start" in failed[0].__dict__["error"]
        # each attempt waited its delay: no busy loop
        times = [killed_at] + [r.created for r in failed]
        for before, after, delay in zip(times, times[1:], delays, strict=False):
            assert after - before >= delay * 0.95
        assert stats(handle) == EmbeddedStats(up=False, restarts=0,
                                              restart_failures=len(failed))

        handle.embedded.binary = "redis-server"                      # fixed: it comes back
        await wait_until(lambda: stats(handle).up, timeout_s=5)
        assert stats(handle).restarts == 1
        assert await handle.redis.get("tessera-backoff-check") == b"kept"


async def test_external_store_has_no_embedded_stats(redis_server: EmbeddedRedis,
                                                    data_dir: Path) -> None:
    settings = StoreSettings(redis_url=redis_server.url, data_dir=data_dir)
    async with await open_store(settings) as handle:
        assert handle.embedded_stats() is None
