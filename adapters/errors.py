"""Typed errors of the adapter core. The server maps each class to one HTTP status."""

from __future__ import annotations


class AdapterError(Exception):
    """Base class of every error the adapter core raises on purpose."""


class AdapterValidationError(AdapterError):
    """A weight set or config does not fit the base model (HTTP 422).

    ``tensor`` names the offending tensor (``<module path>.<tensor name>``) or config field.
    """

    def __init__(self, reason: str, *, tensor: str | None = None) -> None:
        self.tensor = tensor
        self.reason = reason
        super().__init__(f"{tensor}: {reason}" if tensor else reason)


class UnsupportedAdapterError(AdapterError):
    """A well-formed artifact that cannot run on a shared frozen base (HTTP 422)."""


class UnsafeFormatError(AdapterError):
    """Pickle-based or otherwise non-safetensors weights (HTTP 415). Never loaded."""


class UnknownMethodError(AdapterError):
    """No method registered under that name (HTTP 422)."""


class NotMergeableError(AdapterError):
    """The method's math has no merged-weight form (e.g. bottleneck layers)."""


class PoolError(AdapterError):
    """A slot-pool operation that cannot be done (bad slot or slot id, method not enabled,
    prepared data that does not fit this pool). An adapter over the pool's rank limits is
    an ``AdapterValidationError``: it is invalid for this deployment."""
