"""Shared by the end-to-end tests and the HTTP benchmark: settings that read keyword
arguments only, and the real app served by uvicorn on a free loopback port."""

from __future__ import annotations

import threading
import time

from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from tessera.engine.settings import EngineSettings
from tessera.server.app import create_app
from tessera.server.runner import TesseraServer
from tessera.server.server_settings import ServerSettings
from tessera.store.embedded import free_port
from tessera.store.settings import StoreSettings


class Hermetic:
    """Mixin for pydantic-settings classes: values from keyword arguments only, so no
    TESSERA_* variable of the machine running tests or benchmarks leaks in."""

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


class HermeticSettings(Hermetic, EngineSettings):
    pass


class HermeticStoreSettings(Hermetic, StoreSettings):
    pass


class HermeticServerSettings(Hermetic, ServerSettings):
    pass


class LiveServer:
    """``create_app(settings)`` under uvicorn in a daemon thread; ``url`` once it accepts."""

    def __init__(self, settings: ServerSettings, start_timeout_s: float = 300) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings)
        self.start_timeout_s = start_timeout_s
        self.server = TesseraServer(self.app, host="127.0.0.1", port=self.port,
                                    log_level="warning",
                                    drain_timeout_s=settings.engine.drain_timeout_s)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)
