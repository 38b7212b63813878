"""Bank kinds by name. A method lists the kinds it writes; the pool allocates them.
Every module in this package defining a :class:`Bank` subclass with a ``kind`` is found
here, so adding a bank is adding one file."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from tessera.adapters.banks.base import Bank

BANKS: dict[str, type[Bank]] = {}
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    for _obj in vars(_module).values():
        if inspect.isclass(_obj) and issubclass(_obj, Bank) and not inspect.isabstract(_obj):
            BANKS[_obj.kind] = _obj

__all__ = ["BANKS", "Bank"]
