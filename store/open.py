"""Open the store's Redis: an embedded ``redis-server`` tessera owns, or a configured URL.

``settings.redis_url is None`` (the default): tessera starts ``redis-server`` on
``settings.data_dir`` listening on a unix socket only (``port 0``), with AOF on and
``appendfsync`` from the settings, and stops it when the handle closes. While the handle is
open a :class:`tessera.store.embedded.Supervisor` restarts that server if it dies (same data
directory, capped exponential backoff); the client reconnects by itself. A lock file keeps
two tessera processes off one data directory; a ``redis-server`` left running on that
socket by a tessera that died is shut down (it flushes its AOF) and replaced.

``settings.redis_url`` set (``redis://``, ``rediss://``, ``unix://``, with ACL
``user:password@`` if needed): tessera only connects. Passwords never reach the logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from redis import exceptions as rex
from redis.asyncio import Redis

from tessera.store.cache import HostCache
from tessera.store.client import connect
from tessera.store.embedded import EmbeddedRedis, EmbeddedStats, Supervisor
from tessera.store.errors import StoreUnavailableError
from tessera.store.keys import Keys
from tessera.store.resilient import CachedStore
from tessera.store.settings import StoreSettings
from tessera.store.store import AdapterStore
from tessera.store.watch import ChangeWatcher

log = logging.getLogger(__name__)

# sun_path is 108 bytes on Linux, 104 on macOS (including the terminating NUL)
_MAX_SOCKET_PATH = 103


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs and error messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


@dataclass
class StoreHandle:
    """The open Redis connection (and the embedded server, when tessera owns one).

    Close it with ``await handle.close()`` or use it as ``async with``."""

    settings: StoreSettings
    redis: Redis
    keys: Keys
    url: str
    embedded: EmbeddedRedis | None = None
    _supervisor: Supervisor | None = field(default=None, repr=False)
    _lock: _DataDirLock | None = field(default=None, repr=False)
    _closed: bool = field(default=False, repr=False)

    def adapter_store(self) -> AdapterStore:
        """An :class:`AdapterStore` on this connection."""
        return AdapterStore(self.redis, self.keys, self.settings)

    def cached_store(self, size_of: Callable[[Any], int]) -> CachedStore:
        """A :class:`CachedStore` on this connection: host cache of
        ``settings.host_cache_bytes`` (entries measured by ``size_of``) and a change
        watcher. Start it with ``async with`` (or ``await cached.start()``)."""
        return CachedStore(self.adapter_store(),
                           HostCache(self.settings.host_cache_bytes, size_of),
                           ChangeWatcher(self.redis, self.keys, self.settings))

    def embedded_stats(self) -> EmbeddedStats | None:
        """Whether the embedded redis-server is up and how often it was restarted; None
        with an external Redis (tessera does not own that one)."""
        return self._supervisor.stats() if self._supervisor is not None else None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._supervisor is not None:
            # first, and awaited: a restart in progress finishes, then none starts again,
            # so the stop below is never taken for a death
            await self._supervisor.stop()
        with contextlib.suppress(Exception):
            await self.redis.aclose()
        if self.embedded is not None:
            pid = self.embedded.pid
            await asyncio.to_thread(self.embedded.stop)
            log.info("store: embedded redis-server stopped",
                     extra={"pid": pid, "data_dir": str(self.embedded.data_dir)})
        if self._lock is not None:
            self._lock.release()

    async def __aenter__(self) -> StoreHandle:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()


async def open_store(settings: StoreSettings) -> StoreHandle:
    """Connect to ``settings.redis_url``, or start and own an embedded redis-server."""
    keys = Keys(settings.key_prefix)
    if settings.redis_url is not None:
        return await _open_external(settings, keys, settings.redis_url)
    return await _open_embedded(settings, keys)


async def _open_external(settings: StoreSettings, keys: Keys, url: str) -> StoreHandle:
    shown = redact_url(url)
    redis = connect(url, settings)
    try:
        await redis.ping()
        log.info("store: using external Redis", extra={"url": shown})
    except (rex.AuthenticationError, rex.AuthorizationError, rex.NoPermissionError) as exc:
        await redis.aclose()
        raise StoreUnavailableError(f"Redis at {shown} refused the credentials: "
                                    f"{type(exc).__name__}") from exc
    except (rex.RedisError, OSError) as exc:
        # not fatal: the server may come up later; reads and writes report it until then
        log.warning("store: external Redis unreachable at startup, will keep retrying",
                    extra={"url": shown, "error": type(exc).__name__})
    return StoreHandle(settings=settings, redis=redis, keys=keys, url=url)


async def _open_embedded(settings: StoreSettings, keys: Keys) -> StoreHandle:
    data_dir = settings.data_dir.expanduser().resolve()
    server = EmbeddedRedis(data_dir, port=None, binary=settings.redis_server_binary,
                           appendfsync=settings.appendfsync,
                           maxmemory=settings.embedded_maxmemory)
    if len(os.fsencode(server.socket_path)) > _MAX_SOCKET_PATH:
        raise StoreUnavailableError(
            f"unix socket path {server.socket_path} is too long for the OS "
            f"(max {_MAX_SOCKET_PATH} bytes): set TESSERA_STORE_DATA_DIR to a shorter path")
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = _DataDirLock(data_dir / "tessera.lock")
    lock.acquire()
    try:
        if _answers(server.socket_path):
            await _shutdown_orphan(server.socket_path, settings)
        await asyncio.to_thread(server.start, settings.embedded_start_timeout_s)
    except BaseException:
        lock.release()
        raise
    log.info("store: started embedded redis-server",
             extra={"data_dir": str(data_dir), "socket": str(server.socket_path),
                    "pid": server.pid, "appendfsync": settings.appendfsync})
    supervisor = Supervisor(server, interval_s=settings.embedded_watch_interval_s,
                            backoff_s=settings.embedded_restart_backoff_s,
                            backoff_cap_s=settings.embedded_restart_backoff_cap_s,
                            start_timeout_s=settings.embedded_start_timeout_s)
    supervisor.start()
    return StoreHandle(settings=settings, redis=connect(server.url, settings), keys=keys,
                       url=server.url, embedded=server, _supervisor=supervisor, _lock=lock)


def _answers(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            sock.connect(str(path))
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


async def _shutdown_orphan(path: Path, settings: StoreSettings, timeout_s: float = 10.0) -> None:
    """A redis-server still serves our socket although no tessera holds the lock: one that
    outlived the tessera that started it. SHUTDOWN makes it flush its AOF and exit."""
    log.warning("store: shutting down a redis-server left running on the data directory",
                extra={"socket": str(path)})
    client = connect(f"unix://{path}", settings)
    try:
        with contextlib.suppress(rex.ConnectionError, rex.TimeoutError, OSError):
            await client.shutdown()
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()
    deadline = time.monotonic() + timeout_s
    while await asyncio.to_thread(_answers, path):
        if time.monotonic() > deadline:
            raise StoreUnavailableError(f"a redis-server on {path} did not shut down; "
                                        "stop it, then start tessera again")
        await asyncio.sleep(0.05)


class _DataDirLock:
    """An exclusive ``flock`` on ``<data_dir>/tessera.lock`` for the handle's lifetime."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        file = open(self.path, "a+")  # noqa: SIM115 -- held open until release()
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            file.seek(0)
            owner = file.read().strip() or "unknown"
            file.close()
            raise StoreUnavailableError(
                f"data directory {self.path.parent} is in use by another tessera process "
                f"(pid {owner}); give each process its own TESSERA_STORE_DATA_DIR or point "
                "them at one Redis with TESSERA_STORE_REDIS_URL") from exc
        file.seek(0)
        file.truncate()
        file.write(str(os.getpid()))
        file.flush()
        self._file = file

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
