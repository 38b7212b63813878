"""Importing this package registers every built-in method: each module in it calls
``tessera.adapters.registry.register`` once, so adding a method is adding one file here."""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    importlib.import_module(f"{__name__}.{_info.name}")
