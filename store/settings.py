"""Store settings: passed in by the server (``TESSERA_STORE_*`` environment variables when
built with ``StoreSettings()``); nothing here is read from globals at import time."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from platformdirs import user_data_dir
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_data_dir() -> Path:
    return Path(user_data_dir("tessera", appauthor=False)) / "redis"


class StoreSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TESSERA_STORE_", extra="forbid")

    redis_url: str | None = Field(
        None, description="redis://, rediss:// or unix:// URL (ACL user:password allowed); "
                          "None = start and own an embedded local redis-server")
    key_prefix: str = Field("tessera", pattern=r"^[A-Za-z0-9_-]{1,32}$")
    # embedded redis-server
    data_dir: Path = Field(default_factory=default_data_dir)
    redis_server_binary: str = "redis-server"
    appendfsync: Literal["always", "everysec", "no"] = "everysec"
    embedded_maxmemory: str = Field("0", description="redis maxmemory, e.g. '2gb'; 0 = none")
    embedded_watch_interval_s: float = Field(
        0.25, gt=0, description="how often the supervisor checks the embedded redis-server "
                                "is still running")
    embedded_restart_backoff_s: float = Field(
        0.2, gt=0, description="delay before restarting an embedded redis-server that died; "
                               "doubles with each further death or failed start")
    embedded_restart_backoff_cap_s: float = Field(
        10.0, gt=0, description="the most the restart delay grows to; a server that stays up "
                                "this long resets it to embedded_restart_backoff_s")
    embedded_start_timeout_s: float = Field(
        10.0, gt=0, description="how long a (re)started embedded redis-server has to answer "
                                "PING (it loads the AOF first)")
    # client behaviour: writes fail within ~connect + retries x (timeout + backoff)
    socket_timeout_s: float = Field(1.0, gt=0)
    connect_timeout_s: float = Field(0.5, gt=0)
    retries: int = Field(2, ge=0)
    backoff_base_s: float = Field(0.05, gt=0)
    backoff_cap_s: float = Field(0.25, gt=0)
    # data
    chunk_bytes: int = Field(8 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    history_limit: int = Field(1000, ge=1)
    host_cache_bytes: int = Field(2 * 1024**3, ge=0)
    poll_interval_s: float = Field(5.0, gt=0, description="periodic version check")
