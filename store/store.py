"""The async adapter store the server talks to: one facade over tenants, adapters, task
bindings and HyperLoader records, all kept in Redis.

Construct with an already-connected ``redis.asyncio.Redis`` (see
:func:`tessera.store.client.connect`), a :class:`tessera.store.keys.Keys` and
:class:`tessera.store.settings.StoreSettings`::

    store = AdapterStore(redis, Keys(settings.key_prefix), settings)

Rules every method keeps:

* every name goes through :func:`tessera.store.names.check_name` before Redis is touched
  (:class:`InvalidNameError`);
* keys are tenant-scoped, so another tenant's object and an unknown one are the same
  :class:`NotFoundError`;
* every mutation is one Lua script (:mod:`tessera.store.lua`) that also bumps ``Keys.changes()``
  and publishes a JSON event on ``Keys.events()``;
* Redis failures surface as :class:`StoreUnavailableError` / :class:`StoreFullError`.
"""

from __future__ import annotations

from tessera.store.adapters import AdapterOps
from tessera.store.client import translate_errors
from tessera.store.hypernets import HypernetOps
from tessera.store.tasks import TaskOps
from tessera.store.tenants import TenantOps


class AdapterStore(TenantOps, AdapterOps, TaskOps, HypernetOps):
    """``AdapterStore(redis, keys, settings)``; see the module docstring."""

    async def change_counter(self) -> int:
        """The global change counter (a replica's periodic version check compares it)."""
        with translate_errors("read change counter"):
            raw = await self._redis.get(self._keys.changes())
        return int(raw) if raw is not None else 0
