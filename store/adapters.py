"""Adapter uploads: immutable versions 1, 2, ... per (tenant, name), weights in blobs.

A version is confirmed when :meth:`AdapterOps.put_adapter` returns, i.e. after the commit
script returned -- with ``appendfsync always`` that is after Redis fsynced it. Version
numbers are never reused, even after a delete (caches key weights by version).
"""

from __future__ import annotations

import logging
from typing import Any

from tessera.store.base import StoreBase, VersionedPut, check_version, now, raise_for
from tessera.store.blobs import digest
from tessera.store.client import translate_errors
from tessera.store.errors import InvalidNameError, NotFoundError
from tessera.store.models import (
    ADAPTER_DELETED,
    ADAPTER_PUT,
    FORMATS,
    AdapterFormat,
    AdapterVersion,
    as_int,
    event_json,
    text,
)
from tessera.store.names import check_name

log = logging.getLogger("tessera.store.adapters")


def check_format(value: str) -> AdapterFormat:
    if value not in FORMATS:
        raise InvalidNameError(f"format {value!r} is not one of {sorted(FORMATS)}")
    return value  # type: ignore[return-value]


def check_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    metadata = dict(metadata or {})
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError("metadata must map str to str")
    return metadata


class AdapterOps(StoreBase):
    async def put_adapter(self, tenant: str, name: str, *, method: str, format: str,
                          config: dict[str, Any], manifest: dict[str, Any], weights: bytes,
                          base_fingerprint: str, uploader: str,
                          metadata: dict[str, str] | None = None) -> AdapterVersion:
        """Store ``weights`` as the next version of ``name``; returns it once durable."""
        check_name(tenant, "tenant")
        check_name(name, "adapter")
        check_name(method, "method")
        fmt = check_format(format)
        meta = check_metadata(metadata)
        weights = bytes(weights)
        sha = await digest(weights)
        created = now()

        def record(version: int) -> AdapterVersion:
            return AdapterVersion(tenant=tenant, name=name, version=version, method=method,
                                  format=fmt, config=config, manifest=manifest,
                                  base_fingerprint=base_fingerprint, sha256=sha,
                                  size=len(weights), created=created, uploader=uploader,
                                  metadata=meta)

        version = await self._put_versioned(
            f"put adapter {tenant}/{name}", VersionedPut(self._keys, "adapter", tenant, name),
            weights, sha, lambda v: record(v).to_hash(),
            lambda v: event_json(ADAPTER_PUT, tenant, name, v))
        log.info("adapter version stored", extra={"tenant": tenant, "adapter": name,
                                                  "version": version, "sha256": sha,
                                                  "size": len(weights)})
        return record(version)

    async def get_version(self, tenant: str, name: str, version: int) -> AdapterVersion:
        check_name(tenant, "tenant")
        check_name(name, "adapter")
        check_version(version)
        with translate_errors("get adapter version"):
            raw = await self._redis.hgetall(self._keys.adapter_version(tenant, name, version))
        if not raw:
            raise NotFoundError(f"adapter {name!r} version {version} not found")
        return AdapterVersion.from_hash(raw)

    async def get_weights(self, tenant: str, name: str, version: int) -> bytes:
        """The version's weights, bit-exact, sha256-verified."""
        record = await self.get_version(tenant, name, version)
        with translate_errors("get adapter weights"):
            try:
                return await self._blobs.read(record.sha256)
            except NotFoundError:  # the version was deleted while we read it
                raise NotFoundError(f"adapter {name!r} version {version} not found") from None

    async def list_adapters(self, tenant: str) -> list[str]:
        """Names with at least one stored version."""
        check_name(tenant, "tenant")
        with translate_errors("list adapters"):
            members = await self._redis.smembers(self._keys.adapters(tenant))
        return sorted(text(m) for m in members)

    async def list_versions(self, tenant: str, name: str) -> list[AdapterVersion]:
        check_name(tenant, "tenant")
        check_name(name, "adapter")
        k = self._keys
        with translate_errors("list adapter versions"):
            numbers = [as_int(v) for v in await self._redis.zrange(k.adapter_versions(tenant,
                                                                                   name), 0, -1)]
            async with self._redis.pipeline(transaction=False) as pipe:
                for v in numbers:
                    pipe.hgetall(k.adapter_version(tenant, name, v))
                raws = await pipe.execute()
        return [AdapterVersion.from_hash(raw) for raw in raws if raw]

    async def delete_version(self, tenant: str, name: str, version: int) -> None:
        """Delete one version. ConflictError while a task is bound to it; its blob goes
        only when nothing else references it."""
        check_name(tenant, "tenant")
        check_name(name, "adapter")
        check_version(version)
        k = self._keys
        key = k.adapter_version(tenant, name, version)

        async def attempt() -> tuple[str, list[str]]:
            raw_sha = await self._redis.hget(key, "sha256")
            if raw_sha is None:
                return "NOTFOUND", [f"version {version}"]
            sha = text(raw_sha)
            release = await self._blobs.chunk_counts([sha])
            return await self._run(
                self._delete_adapter_version,
                [key, k.adapter_versions(tenant, name), k.adapters(tenant),
                 k.task_refs(tenant), k.changes(), *release.keys(k)],
                [*release.args(), version, name, k.binding_ref(name, version), sha,
                 k.events(), event_json(ADAPTER_DELETED, tenant, name, version)])

        status, rest = await self._retrying(f"delete adapter {tenant}/{name}", attempt)
        raise_for(status, rest, f"adapter {name!r}")
        log.info("adapter version deleted", extra={"tenant": tenant, "adapter": name,
                                                   "version": version})
