"""Settings of the HTTP server: passed to :func:`tessera.server.app.create_app` (``TESSERA_*``
environment variables when built with ``ServerSettings()``; the engine's own fields keep
their ``TESSERA_*`` names, the store's ``TESSERA_STORE_*``). Nothing is read at import."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from tessera.engine.settings import EngineSettings
from tessera.store.settings import StoreSettings


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TESSERA_", extra="forbid",
                                      protected_namespaces=())

    admin_key: SecretStr | None = Field(
        None, description="bearer key of the administrator (creates tenants); None = no "
                          "admin endpoints")
    max_upload_bytes: int = Field(256 * 1024 * 1024, ge=1024,
                                  description="request body limit of an adapter upload")
    max_request_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="body limit of every other request (JSON): "
                                              "larger bodies get 413 before they are read")
    api_docs: bool = Field(True, description="serve the interactive API docs at /docs and "
                                             "/redoc (off in the production manifests)")
    max_archive_bytes: int = Field(512 * 1024 * 1024, ge=1024,
                                   description="uncompressed bytes read from an archive")
    base_alias: str = Field("base", description="model name meaning 'no adapter'")
    max_choices: int = Field(16, ge=1, le=1024, description=(
        "choices one OpenAI request may ask for: n x prompts, each its own engine request "
        "(400 above it)"))
    lora_adapter_root: Path | None = Field(None, description=(
        "the only directory vLLM's /v1/load_lora_adapter reads lora_path from (resolved; "
        "symlinks leaving it refused); None = that endpoint and /v1/unload_lora_adapter "
        "answer 403"))
    engine: EngineSettings = Field(default_factory=EngineSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
