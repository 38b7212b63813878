"""tessera's adapter core: methods, slot pools and injection into Hugging Face models."""

from tessera.adapters import methods as _methods  # noqa: F401  (registers the built-in methods)
from tessera.adapters.errors import (
    AdapterError,
    AdapterValidationError,
    NotMergeableError,
    PoolError,
    UnknownMethodError,
    UnsafeFormatError,
    UnsupportedAdapterError,
)
from tessera.adapters.method import Adapter, Component, Limits, Method, MethodConfig, SlotData
from tessera.adapters.pool import PoolConfig, PreparedAdapter, SlotPool
from tessera.adapters.reference import merged_model, merged_weights, reference_model

__all__ = [
    "Adapter",
    "AdapterError",
    "AdapterValidationError",
    "Component",
    "Limits",
    "Method",
    "MethodConfig",
    "NotMergeableError",
    "PoolConfig",
    "PoolError",
    "PreparedAdapter",
    "SlotData",
    "SlotPool",
    "UnknownMethodError",
    "UnsafeFormatError",
    "UnsupportedAdapterError",
    "merged_model",
    "merged_weights",
    "reference_model",
]
