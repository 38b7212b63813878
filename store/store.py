"""The async adapter store the server talks to: one facade over tenants, adapters, task
bindings and HyperLoader records, all kept in Redis.

Construct with an already-connected ``redis.asyncio.Redis`` (see :func:`store.client.connect`),
a :class:`store.keys.Keys` and :class:`store.settings.StoreSettings`::

    store = AdapterStore(redis, Keys(settings.key_prefix), settings)

Rules every method keeps:

* every name goes through :func:`store.names.check_name` before Redis is touched
  (:class:`InvalidNameError`);
* keys are tenant-scoped, so another tenant's object and an unknown one are the same
  :class:`NotFoundError`;
* every mutation is one Lua script (:mod:`store.lua`) that also bumps ``Keys.changes()``
  and publishes a JSON event on ``Keys.events()``;
* Redis failures surface as :class:`StoreUnavailableError` / :class:`StoreFullError`.
"""

from __future__ import annotations

from store.adapters import AdapterOps
from store.client import translate_errors
from store.hypernets import HypernetOps
from store.tasks import TaskOps
from store.tenants import TenantOps


class AdapterStore(TenantOps, AdapterOps, TaskOps, HypernetOps):
    """``AdapterStore(redis, keys, settings)``; see the module docstring."""

    async def change_counter(self) -> int:
        """The global change counter (a replica's periodic version check compares it)."""
        with translate_errors("read change counter"):
            raw = await self._redis.get(self._keys.changes())
        return int(raw) if raw is not None else 0
