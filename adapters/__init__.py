"""tessera's adapter core: methods, slot pools and injection into Hugging Face models."""

from adapters import methods as _methods  # noqa: F401  (registers the built-in methods)
from adapters.errors import (
    AdapterError,
    AdapterValidationError,
    NotMergeableError,
    PoolError,
    UnknownMethodError,
    UnsafeFormatError,
    UnsupportedAdapterError,
)
from adapters.method import Adapter, Component, Limits, Method, MethodConfig, SlotData
from adapters.pool import PoolConfig, PreparedAdapter, SlotPool
from adapters.reference import merged_model, merged_weights, reference_model

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
