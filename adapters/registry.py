"""Methods by name. Each method module registers itself on import."""

from __future__ import annotations

from typing import Any

from adapters.errors import UnknownMethodError
from adapters.method import Method

_METHODS: dict[str, Method[Any]] = {}


def register(method: Method[Any]) -> Method[Any]:
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} registered twice")
    _METHODS[method.name] = method
    return method


def get(name: str) -> Method[Any]:
    try:
        return _METHODS[name]
    except KeyError:
        known = ", ".join(sorted(_METHODS))
        raise UnknownMethodError(f"unknown adapter method {name!r} (known: {known})") from None


def names() -> list[str]:
    return sorted(_METHODS)
