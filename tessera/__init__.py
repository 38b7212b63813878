"""tessera: multi-tenant adapter serving.

The repository keeps one folder per part (``adapters/``, ``store/``, ``engine/``,
``server/``); this package gathers them under one import namespace (``tessera.adapters``,
``tessera.store``, ``tessera.engine``, ``tessera.server``) through the links beside this
file, so an install never collides with other distributions' top-level names.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tessera-serve")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0"
