"""uvicorn with tessera's shutdown order: drain the engine first, then close connections.

Plain uvicorn, on SIGTERM, waits ``timeout_graceful_shutdown`` for open connections, then
cancels them, and only then runs the app's lifespan shutdown (which drained the engine):
a stream longer than that wait was cut with no finish reason. :class:`TesseraServer`
drains the engine as the first step of the shutdown, while the connections are still
open: the engine stops accepting (new requests get 503, ``/readyz`` turns 503), running
requests get ``drain_timeout_s`` to finish, the rest end with finish reason
``shutdown`` — a final chunk and ``[DONE]`` on every stream — and only then does uvicorn
close the connections (its own wait is the drain plus a short grace for the last bytes).

The CLI's ``serve`` runs this class; :class:`BackgroundServer` runs it in a thread of the
calling process (the demo's server, the tests' live server, the HTTP benchmarks).

Logging is the application's: by default (``log_config=None``) uvicorn installs no handlers
of its own and its loggers propagate to the root logger
(:func:`tessera.server.logs.configure_logging` in the CLI); pass uvicorn's
``LOGGING_CONFIG`` (or a file name) to have uvicorn configure them itself.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any, Self

import uvicorn
from fastapi import FastAPI

from tessera.server.app import create_app
from tessera.server.server_settings import ServerSettings
from tessera.store.embedded import free_port

log = logging.getLogger(__name__)

FLUSH_GRACE_S = 5  # after the drain: time for the final chunks to reach the clients


class TesseraServer(uvicorn.Server):
    def __init__(self, app: FastAPI, *, host: str, port: int, log_level: str = "info",
                 drain_timeout_s: float = 30.0,
                 log_config: dict[str, Any] | str | None = None) -> None:
        self.app = app
        self.drain_timeout_s = drain_timeout_s
        super().__init__(uvicorn.Config(
            app, host=host, port=port, log_level=log_level, log_config=log_config,
            lifespan="on", timeout_graceful_shutdown=int(drain_timeout_s) + FLUSH_GRACE_S))

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        engine = getattr(self.app.state, "engine", None)
        if engine is not None and getattr(self.app.state, "owns_engine", False):
            log.info("draining the engine before closing connections",
                     extra={"drain_timeout_s": self.drain_timeout_s})
            try:
                await engine.drain(self.drain_timeout_s)
            except Exception:  # the shutdown goes on whatever the drain did
                log.exception("engine drain failed")
        await super().shutdown(sockets)


class BackgroundServer:
    """``create_app(settings)`` under :class:`TesseraServer` on ``127.0.0.1:port`` (a free
    one unless given), in a daemon thread of this process: a context manager whose ``url``
    accepts once entered, and whose exit drains and stops it. In-process so the caller can
    reach ``app.state`` (the engine, the service) while clients talk real HTTP."""

    def __init__(self, settings: ServerSettings, port: int | None = None, *,
                 start_timeout_s: float = 300, thread_name: str = "uvicorn") -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings)
        self.start_timeout_s = start_timeout_s
        self.server = TesseraServer(self.app, host="127.0.0.1", port=self.port,
                                    log_level="warning",
                                    drain_timeout_s=settings.engine.drain_timeout_s)
        self.thread = threading.Thread(target=self.server.run, name=thread_name, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.server.should_exit = True  # a slow start must not come up later
                raise RuntimeError("the server did not start (its log above says why)")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)
