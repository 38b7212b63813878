"""uvicorn with tessera's shutdown order: drain the engine first, then close connections.

Plain uvicorn, on SIGTERM, waits ``timeout_graceful_shutdown`` for open connections, then
cancels them, and only then runs the app's lifespan shutdown (which drained the engine):
a stream longer than that wait was cut with no finish reason. :class:`TesseraServer`
drains the engine as the first step of the shutdown, while the connections are still
open: the engine stops accepting (new requests get 503, ``/readyz`` turns 503), running
requests get ``drain_timeout_s`` to finish, the rest end with finish reason
``shutdown`` — a final chunk and ``[DONE]`` on every stream — and only then does uvicorn
close the connections (its own wait is the drain plus a short grace for the last bytes).

The CLI's ``serve`` and the tests' live server both run this class. Logging is the
application's: by default (``log_config=None``) uvicorn installs no handlers of its own and
its loggers propagate to the root logger (:func:`tessera.server.logs.configure_logging` in the CLI);
pass uvicorn's ``LOGGING_CONFIG`` (or a file name) to have uvicorn configure them itself.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import uvicorn
from fastapi import FastAPI

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
