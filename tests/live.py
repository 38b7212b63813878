"""Shared by the end-to-end tests and the HTTP benchmark: settings that read keyword
arguments only, and the real app served by uvicorn on a free loopback port."""

from __future__ import annotations

from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from tessera.engine.settings import EngineSettings
from tessera.server.runner import BackgroundServer
from tessera.server.server_settings import ServerSettings
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


# ``create_app(settings)`` under uvicorn in a daemon thread; ``url`` once it accepts. The
# package's own helper, the one the demo serves with.
LiveServer = BackgroundServer
