"""Methods and generators by name. Each module registers itself on import.

A *method* (LoRA, HUT, ...) is math applied in slots. A *generator* (HyperLoader) produces
ordinary adapters made of method components; it is registered under its own name too, so
``tessera`` knows every adapter kind by one name space.
"""

from __future__ import annotations

from typing import Any, Protocol

from tessera.adapters.errors import UnknownMethodError
from tessera.adapters.method import Method


class Generator(Protocol):
    """Something that turns a stored artifact plus a task into an ``Adapter``."""

    name: str


_METHODS: dict[str, Method[Any]] = {}
_GENERATORS: dict[str, Generator] = {}


def register(method: Method[Any]) -> Method[Any]:
    if method.name in _METHODS or method.name in _GENERATORS:
        raise ValueError(f"{method.name!r} registered twice")
    _METHODS[method.name] = method
    return method


def register_generator(generator: Generator) -> Generator:
    if generator.name in _METHODS or generator.name in _GENERATORS:
        raise ValueError(f"{generator.name!r} registered twice")
    _GENERATORS[generator.name] = generator
    return generator


def get(name: str) -> Method[Any]:
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownMethodError(f"unknown adapter method {name!r} "
                                 f"(known: {', '.join(names())})") from None


def get_generator(name: str) -> Generator:
    try:
        return _GENERATORS[name]
    except KeyError:
        raise UnknownMethodError(f"unknown adapter generator {name!r} "
                                 f"(known: {', '.join(sorted(_GENERATORS))})") from None


def names() -> list[str]:
    """Slot methods."""
    return sorted(_METHODS)


def all_names() -> list[str]:
    """Slot methods and generators."""
    return sorted([*_METHODS, *_GENERATORS])
