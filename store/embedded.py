"""An embedded ``redis-server`` that tessera starts, owns and stops.

With no Redis URL configured, tessera runs a local ``redis-server`` (Debian/Ubuntu:
``apt-get install redis-server``; macOS: ``brew install redis``) with AOF on, data in the
user's data directory, listening on a unix socket only (``port 0``: no TCP at all) unless a
loopback port is asked for (tests do). The same class starts the real servers test fixtures
use, and can ``kill -9`` and restart them on the same data directory.

tessera owns that process, so it also keeps it alive: :class:`Supervisor` notices when it
died (``kill -9``, a crash, the OOM killer) and starts it again on the same data directory,
with capped exponential backoff; the AOF brings back every write it confirmed. Clients
reconnect on their own (redis-py drops a broken pooled connection and dials again).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tessera.store.errors import StoreUnavailableError

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """A ``redis-server`` child process on ``data_dir``.

    ``port=None``: unix socket ``<data_dir>/redis.sock`` only. ``port=N``: 127.0.0.1:N only.
    """

    def __init__(self, data_dir: Path, *, port: int | None = None,
                 binary: str = "redis-server",
                 appendfsync: Literal["always", "everysec", "no"] = "everysec",
                 maxmemory: str = "0") -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.binary = binary
        self.appendfsync = appendfsync
        self.maxmemory = maxmemory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "redis.sock"

    @property
    def url(self) -> str:
        if self.port is not None:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path}?db=0"

    def _args(self) -> list[str]:
        binary = shutil.which(self.binary)
        if binary is None:
            raise StoreUnavailableError(
                f"{self.binary!r} not found: install it (Debian/Ubuntu: apt-get install "
                "redis-server; macOS: brew install redis) or configure a Redis URL")
        args = [binary, "--dir", str(self.data_dir), "--appendonly", "yes",
                "--appendfsync", self.appendfsync, "--save", "",
                "--maxmemory", self.maxmemory, "--maxmemory-policy", "noeviction",
                "--daemonize", "no", "--logfile", str(self.data_dir / "redis.log"),
                "--protected-mode", "yes"]
        if self.port is None:
            args += ["--port", "0", "--unixsocket", str(self.socket_path),
                     "--unixsocketperm", "700"]
        else:
            args += ["--port", str(self.port), "--bind", "127.0.0.1"]
        return args

    def start(self, timeout_s: float = 10.0) -> None:
        if self.running:
            return
        self._close()  # a process that died (killed, crashed): its stderr pipe
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.port is None and self.socket_path.exists():
            self.socket_path.unlink()  # left by a killed server
        self.process = subprocess.Popen(self._args(), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if (
                    self.process.stderr) else ""
                raise StoreUnavailableError(f"redis-server exited at start: {err.strip()} "
                                            f"(log: {self.data_dir / 'redis.log'})")
            if self._ping():
                log.info("embedded redis-server started", extra={"url": self.url,
                                                                 "pid": self.process.pid})
                return
            time.sleep(0.02)
        self.kill()
        raise StoreUnavailableError(f"redis-server did not answer within {timeout_s} s")

    def _ping(self) -> bool:
        family = socket.AF_INET if self.port is not None else socket.AF_UNIX
        address: str | tuple[str, int] = (("127.0.0.1", self.port) if self.port is not None
                                          else str(self.socket_path))
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.5)
                sock.connect(address)
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful: SIGTERM makes redis-server flush the AOF and exit."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._close()

    def kill(self) -> None:
        """``kill -9``: no flush, no goodbye (what the durability tests do)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._close()

    def _close(self) -> None:
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class EmbeddedStats:
    """A :class:`Supervisor`'s state, read by the metrics at scrape time."""

    up: bool                # the server process is running and not being restarted
    restarts: int           # times it died and was started again
    restart_failures: int   # restart attempts that failed (each is retried after a backoff)


class Supervisor:
    """Keeps an :class:`EmbeddedRedis` running: an asyncio task checks it every
    ``interval_s`` and, once it died, starts it again on the same data directory.

    The first restart after a death waits ``backoff_s``; each further death or failed start
    before the server has stayed up ``backoff_cap_s`` doubles the wait, up to
    ``backoff_cap_s``, so a server that cannot start (or dies at once) costs a log line per
    attempt, never a busy loop. Starting runs in a worker thread: the event loop keeps
    serving cached adapters meanwhile.

    Whoever owns the server calls :meth:`start` after starting it, and awaits :meth:`stop`
    *before* stopping it: a deliberate stop is never taken for a death.
    """

    def __init__(self, server: EmbeddedRedis, *, interval_s: float = 0.25,
                 backoff_s: float = 0.2, backoff_cap_s: float = 10.0,
                 start_timeout_s: float = 10.0) -> None:
        self.server = server
        self.interval_s = interval_s
        self.backoff_s = backoff_s
        self.backoff_cap_s = backoff_cap_s
        self.start_timeout_s = start_timeout_s
        self.restarts = 0
        self.restart_failures = 0
        self._up = True
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin watching (from inside the event loop that will :meth:`stop` it)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"embedded-redis-supervisor:{self.server.data_dir}")

    async def stop(self) -> None:
        """Stop watching; returns once no restart is in progress. Idempotent."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait([task])
        if not task.cancelled() and task.exception() is not None:
            log.error("store: embedded redis-server supervisor had failed",
                      exc_info=task.exception())

    @property
    def watching(self) -> bool:
        return self._task is not None and not self._task.done()

    def stats(self) -> EmbeddedStats:
        # ``_up`` first: while a restart runs in its thread, the process is not polled here
        return EmbeddedStats(up=self._up and self.server.running, restarts=self.restarts,
                             restart_failures=self.restart_failures)

    def delay(self, streak: int) -> float:
        """Seconds to wait before the restart attempt that follows ``streak`` earlier
        deaths or failures in a row (0: the first)."""
        return min(self.backoff_s * 2.0 ** min(streak, 32), self.backoff_cap_s)

    async def _run(self) -> None:
        streak = 0                        # deaths and failed starts since the last stable run
        up_since = time.monotonic()
        while True:
            await asyncio.sleep(self.interval_s)
            if self.server.running:
                if streak and time.monotonic() - up_since >= self.backoff_cap_s:
                    streak = 0            # stayed up long enough: the next death is news
                continue
            self._up = False
            down_since = time.monotonic()
            process = self.server.process
            log.error("store: embedded redis-server died; restarting it",
                      extra={"pid": self.server.pid,
                             "returncode": process.returncode if process else None,
                             "data_dir": str(self.server.data_dir),
                             "log": str(self.server.data_dir / "redis.log")})
            while True:
                delay = self.delay(streak)
                streak += 1
                await asyncio.sleep(delay)
                try:
                    await self._start()
                except Exception as exc:  # keep trying whatever went wrong; never die silently
                    self.restart_failures += 1
                    log.warning("store: embedded redis-server restart failed",
                                extra={"attempt": streak, "delay_s": delay,
                                       "next_delay_s": self.delay(streak),
                                       "error": f"{type(exc).__name__}: {exc}",
                                       "data_dir": str(self.server.data_dir)})
                    continue
                break
            self.restarts += 1
            self._up = True
            up_since = time.monotonic()
            log.warning("store: embedded redis-server restarted",
                        extra={"pid": self.server.pid, "attempt": streak, "delay_s": delay,
                               "down_s": round(up_since - down_since, 3),
                               "restarts": self.restarts,
                               "data_dir": str(self.server.data_dir)})

    async def _start(self) -> None:
        attempt = asyncio.ensure_future(
            asyncio.to_thread(self.server.start, self.start_timeout_s))
        try:
            await asyncio.shield(attempt)
        except asyncio.CancelledError:
            # stop() during a start: let the thread finish, so the process it may have
            # spawned exists by the time the owner stops the server (none is left behind)
            await asyncio.wait([attempt])
            if not attempt.cancelled():
                attempt.exception()       # retrieved: a failed start needs no report now
            raise
