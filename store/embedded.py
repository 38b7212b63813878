"""An embedded ``redis-server`` that tessera starts, owns and stops.

With no Redis URL configured, tessera runs a local ``redis-server`` (Debian/Ubuntu:
``apt-get install redis-server``; macOS: ``brew install redis``) with AOF on, data in the
user's data directory, listening on a unix socket only (``port 0``: no TCP at all) unless a
loopback port is asked for (tests do). The same class starts the real servers test fixtures
use, and can ``kill -9`` and restart them on the same data directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Literal

from store.errors import StoreUnavailableError

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
