"""Tenants and their API keys (stored only as sha256 hex; the plaintext is shown once).

``delete_tenant`` refuses (ConflictError) while the tenant owns adapter versions or
hypernetworks -- bound tasks imply an adapter version -- rather than cascading: deleting
someone's models is a decision for whoever calls ``delete_version`` on each of them. What
is left (API keys, deactivated task records and their history) goes with the tenant, in
the same script. Version counters are kept on purpose, so a re-created tenant of the same
name never reuses a version number a cache may still hold.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import uuid

from tessera.store.base import StoreBase, now, raise_for
from tessera.store.client import translate_errors
from tessera.store.errors import NotFoundError
from tessera.store.models import (
    APIKEY_ADDED,
    APIKEY_REVOKED,
    TENANT_CREATED,
    TENANT_DELETED,
    Tenant,
    event_json,
    text,
)
from tessera.store.names import check_name

log = logging.getLogger("tessera.store.tenants")

API_KEY_BYTES = 32


def new_api_key(prefix: str = "tsk") -> str:
    """A random bearer key, ``<prefix>_<43 url-safe characters>``. The prefix tells keys
    apart in logs and secret scanners, and keeps a key from starting with ``-`` (which a
    bare ``token_urlsafe`` does one time in 64, and which a command line then reads as an
    option: ``--key -Xy...``)."""
    return f"{prefix}_{secrets.token_urlsafe(API_KEY_BYTES)}"


def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


class TenantOps(StoreBase):
    async def create_tenant(self, name: str) -> tuple[Tenant, str]:
        """A new tenant and its first API key (plaintext: returned now, never again)."""
        check_name(name, "tenant")
        k = self._keys
        created = now()
        token = uuid.uuid4().hex
        api_key = ""

        async def attempt() -> tuple[str, list[str]]:
            nonlocal api_key
            api_key = new_api_key()
            return await self._run(
                self._create_tenant,
                [k.tenant(name), k.tenants(), k.tenant_api_keys(name),
                 k.api_key(hash_api_key(api_key)), k.changes()],
                [name, repr(created), hash_api_key(api_key), k.events(),
                 event_json(TENANT_CREATED, name), token])

        status, rest = await self._retrying("create tenant", attempt)
        raise_for(status, rest, f"tenant {name!r}")
        log.info("tenant created", extra={"tenant": name})
        return Tenant(name=name, created=created), api_key

    async def add_api_key(self, tenant: str) -> str:
        check_name(tenant, "tenant")
        k = self._keys
        api_key = ""

        async def attempt() -> tuple[str, list[str]]:
            nonlocal api_key
            api_key = new_api_key()
            key_hash = hash_api_key(api_key)
            return await self._run(
                self._add_api_key,
                [k.tenant(tenant), k.tenant_api_keys(tenant), k.api_key(key_hash),
                 k.changes()],
                [tenant, key_hash, k.events(), event_json(APIKEY_ADDED, tenant)])

        status, rest = await self._retrying("add api key", attempt)
        raise_for(status, rest, f"tenant {tenant!r}")
        log.info("api key added", extra={"tenant": tenant})
        return api_key

    async def revoke_api_key(self, tenant: str, api_key: str) -> None:
        """Revoke one of ``tenant``'s keys, given its plaintext. NotFoundError when it is not
        a live key of that tenant."""
        check_name(tenant, "tenant")
        k = self._keys
        key_hash = hash_api_key(api_key)
        with translate_errors("revoke api key"):
            status, rest = await self._run(
                self._revoke_api_key,
                [k.tenant_api_keys(tenant), k.api_key(key_hash), k.changes()],
                [tenant, key_hash, k.events(), event_json(APIKEY_REVOKED, tenant)])
        raise_for(status, rest, f"tenant {tenant!r}")
        log.info("api key revoked", extra={"tenant": tenant})

    async def tenant_for_key(self, api_key: str) -> str | None:
        """The tenant owning ``api_key``, or None (unknown or revoked)."""
        if not isinstance(api_key, str) or not api_key:
            return None
        with translate_errors("authenticate"):
            raw = await self._redis.get(self._keys.api_key(hash_api_key(api_key)))
        return text(raw) if raw is not None else None

    async def get_tenant(self, name: str) -> Tenant:
        check_name(name, "tenant")
        with translate_errors("get tenant"):
            raw = await self._redis.hgetall(self._keys.tenant(name))
        if not raw:
            raise NotFoundError(f"tenant {name!r} not found")
        return Tenant.from_hash(raw)

    async def list_tenants(self) -> list[Tenant]:
        with translate_errors("list tenants"):
            names = sorted(text(m) for m in await self._redis.smembers(self._keys.tenants()))
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(self._keys.tenant(name))
                raws = await pipe.execute()
        return [Tenant.from_hash(raw) for raw in raws if raw]

    async def delete_tenant(self, name: str) -> None:
        check_name(name, "tenant")
        k = self._keys

        async def attempt() -> tuple[str, list[str]]:
            key_hashes = sorted(text(m) for m in
                                await self._redis.smembers(k.tenant_api_keys(name)))
            tasks = sorted(text(m) for m in await self._redis.smembers(k.tasks(name)))
            task_keys = [key for t in tasks for key in (k.task(name, t),
                                                        k.task_history(name, t))]
            return await self._run(
                self._delete_tenant,
                [k.tenant(name), k.tenants(), k.adapters(name), k.hypernets(name),
                 k.tasks(name), k.tenant_api_keys(name), k.task_refs(name), k.changes(),
                 *(k.api_key(h) for h in key_hashes), *task_keys],
                [name, len(key_hashes), len(tasks), k.events(),
                 event_json(TENANT_DELETED, name), *key_hashes, *tasks])

        status, rest = await self._retrying("delete tenant", attempt)
        raise_for(status, rest, f"tenant {name!r}")
        log.info("tenant deleted", extra={"tenant": name})
