"""The engine: one frozen base model, continuous batching of requests of any mix of
adapters and methods, sampling and detokenization. Depends on :mod:`adapters` only;
:mod:`server` (HTTP, auth, uploads, the store glue) builds one from
:class:`~tessera.engine.settings.EngineSettings`."""

from tessera.engine.core import Engine, EngineStats
from tessera.engine.requests import (
           AdapterSpec,
           Completion,
           GenerationRequest,
           RequestHandle,
           TokenEvent,
)
from tessera.engine.sampling import SamplingParams
from tessera.engine.settings import EngineSettings

__all__ = ["AdapterSpec", "Completion", "Engine", "EngineSettings", "EngineStats",
           "GenerationRequest", "RequestHandle", "SamplingParams", "TokenEvent"]
