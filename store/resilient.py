"""The read side the server uses: :class:`CachedStore` over an :class:`AdapterStore`.

* ``resolve(tenant, task)`` answers from an in-memory binding map that the
  :class:`ChangeWatcher` keeps fresh: a task event marks that task stale, a ``resync`` marks
  everything stale; a stale entry is re-read on its next use. When Redis is unreachable the
  last known binding is served (and Redis is not retried for such reads for a short
  while, so an outage adds no latency to requests that can be answered from memory).
* Adapter version manifests are immutable: cached (bounded, LRU) until deleted.
* ``load_adapter`` returns decoded weights from a byte-bounded :class:`HostCache` keyed by
  content (weights sha256 + a digest of what decoding depends on), loading each at most
  once at a time.
* Writes go straight to Redis and fail fast with :class:`StoreUnavailableError` when it is
  unreachable; nothing here holds a connection, so when Redis is back the same object
  works again (redis-py reconnects its pool; the watcher re-subscribes).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar, cast

from tessera.store.cache import HostCache
from tessera.store.errors import NotFoundError, StoreUnavailableError
from tessera.store.models import (
    ADAPTER_DELETED,
    APIKEY_REVOKED,
    TASK_ACTIVATED,
    TASK_DEACTIVATED,
    TENANT_DELETED,
    AdapterVersion,
    Binding,
    HypernetVersion,
    Tenant,
)
from tessera.store.store import AdapterStore
from tessera.store.tenants import hash_api_key
from tessera.store.watch import ChangeEvent, ChangeWatcher

log = logging.getLogger(__name__)

T = TypeVar("T")


class Decoded(Protocol):
    """What a decoder returns: anything that knows its host memory size."""

    @property
    def nbytes(self) -> int: ...


D = TypeVar("D", bound=Decoded)
Decoder = Callable[[bytes, AdapterVersion], D]
VersionKey = tuple[str, str, int]


@dataclass
class _Entry(Generic[T]):
    value: T
    fresh: bool


def weights_key(record: AdapterVersion) -> str:
    """Host-cache key: the weights' sha256 plus a digest of everything decoding may depend
    on (two versions with identical weights but a different ``lora_alpha`` must not share
    a decoded object)."""
    spec = json.dumps([record.method, record.format, record.config, record.manifest,
                       record.base_fingerprint], sort_keys=True, separators=(",", ":"))
    return f"{record.sha256}:{hashlib.sha256(spec.encode()).hexdigest()[:16]}"


class CachedStore:
    """Cached, outage-tolerant reads and fail-fast writes over one :class:`AdapterStore`.

    ``async with CachedStore(store, cache, watcher):`` starts and stops the watcher.
    ``cache`` holds decoded adapters (its ``size_of`` is typically ``lambda d: d.nbytes``).
    """

    def __init__(self, store: AdapterStore, cache: HostCache[str, Any],
                 watcher: ChangeWatcher, *, max_manifests: int = 100_000,
                 stale_retry_s: float = 1.0, fallback_after_s: float = 0.5,
                 deadline_s: float = 1.5) -> None:
        self.store = store
        self.cache = cache
        self.watcher = watcher
        self._bindings: dict[tuple[str, str], _Entry[Binding]] = {}
        self._auth: dict[str, _Entry[str]] = {}          # api-key sha256 -> tenant
        self._versions: HostCache[VersionKey, AdapterVersion] = HostCache(
            max_manifests, lambda _: 1)
        self._invalidations = 0      # bumped by every invalidation: guards racing reads
        self._stale_retry_s = stale_retry_s
        self._fallback_after_s = fallback_after_s
        self._deadline_s = deadline_s
        self._down_until = 0.0       # monotonic; until then stale entries skip Redis
        self.stale_served = 0
        watcher.add_listener(self._on_change)

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        await self.watcher.start()

    async def stop(self) -> None:
        await self.watcher.stop()

    async def __aenter__(self) -> CachedStore:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    # --- invalidation -------------------------------------------------------------------
    def _on_change(self, event: ChangeEvent) -> None:
        self._invalidations += 1
        if event.is_resync:
            for binding in self._bindings.values():
                binding.fresh = False
            for auth in self._auth.values():
                auth.fresh = False
            self._versions.clear()
            return
        tenant = event.tenant
        if event.kind in (TASK_ACTIVATED, TASK_DEACTIVATED) and event.name is not None:
            entry = self._bindings.get((tenant or "", event.name))
            if entry is not None:
                entry.fresh = False
        elif event.kind == ADAPTER_DELETED and event.name is not None and (
                event.version is not None):
            self._versions.pop((tenant or "", event.name, event.version))
        elif event.kind in (APIKEY_REVOKED, TENANT_DELETED):
            # a revoked key must not keep working from memory, not even during an outage
            for key_hash in [h for h, e in self._auth.items() if e.value == tenant]:
                del self._auth[key_hash]
            if event.kind == TENANT_DELETED:
                for key in [k for k in self._bindings if k[0] == tenant]:
                    del self._bindings[key]

    # --- cached reads -------------------------------------------------------------------
    @property
    def available(self) -> bool:
        """Redis answered the last periodic check and no read fell back to the cache in
        the last ``stale_retry_s`` (health reporting only; never blocks serving)."""
        return self.watcher.reachable and not self._redis_recently_down()

    def _redis_recently_down(self) -> bool:
        return time.monotonic() < self._down_until

    def _fallback(self, what: str, exc: StoreUnavailableError) -> None:
        if not self._redis_recently_down():
            log.warning("store: Redis unreachable, serving last known state",
                        extra={"what": what, "error": str(exc)})
        self._down_until = time.monotonic() + self._stale_retry_s
        self.stale_served += 1

    async def resolve(self, tenant: str, task: str) -> Binding:
        """The task's binding; NotFoundError when unbound (or not this tenant's)."""
        key = (tenant, task)
        entry = self._bindings.get(key)
        if entry is not None and (entry.fresh or self._redis_recently_down()):
            if not entry.fresh:
                self.stale_served += 1
            return entry.value
        seen = self._invalidations
        try:
            binding = await self._bounded(f"read binding {tenant}/{task}",
                                          lambda: self.store.get_binding(tenant, task),
                                          entry is not None)
        except StoreUnavailableError as exc:
            if entry is None:
                raise
            self._fallback(f"binding {tenant}/{task}", exc)
            return entry.value
        if binding is None:
            self._bindings.pop(key, None)
            raise NotFoundError(f"task {task!r} not found")
        self._bindings[key] = _Entry(binding, fresh=seen == self._invalidations)
        return binding

    async def tenant_for_key(self, api_key: str) -> str | None:
        """The tenant owning ``api_key`` (cached; revocations drop it at once)."""
        if not isinstance(api_key, str) or not api_key:
            return None
        key_hash = hash_api_key(api_key)
        entry = self._auth.get(key_hash)
        if entry is not None and (entry.fresh or self._redis_recently_down()):
            return entry.value
        seen = self._invalidations
        try:
            tenant = await self._bounded("authenticate",
                                         lambda: self.store.tenant_for_key(api_key),
                                         entry is not None)
        except StoreUnavailableError as exc:
            if entry is None:
                raise
            self._fallback("api key", exc)
            return entry.value
        if tenant is None:
            self._auth.pop(key_hash, None)
        else:
            self._auth[key_hash] = _Entry(tenant, fresh=seen == self._invalidations)
        return tenant

    async def get_version(self, tenant: str, name: str, version: int) -> AdapterVersion:
        """An immutable version manifest (cached until the version is deleted)."""
        return await self._versions.get_or_load(
            (tenant, name, version),
            lambda: self._bounded(f"read {tenant}/{name} v{version}",
                                  lambda: self.store.get_version(tenant, name, version)))

    async def load_adapter(self, tenant: str, name: str, version: int,
                           decode: Decoder[D]) -> D:
        """Decoded weights of one version, from the host cache or Redis + ``decode`` (run
        in a worker thread). A failed load fails its callers only and is not cached."""
        record = await self.get_version(tenant, name, version)

        async def load() -> D:
            weights = await self.store.get_weights(tenant, name, version)
            return await asyncio.to_thread(decode, weights, record)

        return cast(D, await self.cache.get_or_load(weights_key(record), load))

    async def load_binding(self, tenant: str, task: str,
                           decode: Decoder[D]) -> tuple[Binding, D]:
        """``resolve`` then ``load_adapter``: what one inference request needs."""
        binding = await self.resolve(tenant, task)
        return binding, await self.load_adapter(tenant, binding.adapter, binding.version,
                                                decode)

    # --- deadlines ----------------------------------------------------------------------
    async def _bounded(self, what: str, op: Callable[[], Awaitable[T]],
                       has_fallback: bool = False) -> T:
        """Run ``op`` under a deadline: ``fallback_after_s`` when a last known answer can
        stand in, else ``deadline_s`` (default 1.5 s, under the 2 s the issue allows). A
        refused connection fails at once through redis-py's retries; a hung or black-holed
        server fails at the deadline instead of after every retry's socket timeout."""
        deadline = self._fallback_after_s if has_fallback else self._deadline_s
        try:
            async with asyncio.timeout(deadline):
                return await op()
        except TimeoutError as exc:
            raise StoreUnavailableError(
                f"{what}: no answer from Redis within {deadline} s (for a write the outcome "
                "is unknown; read it back before retrying)") from exc

    # --- writes (fail fast; keep this replica's view current) -------------------------
    async def _write(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        return await self._bounded(what, op)

    async def activate(self, tenant: str, task: str, adapter: str, version: int, *,
                       actor: str, expected_revision: int | None = None) -> Binding:
        seen = self._invalidations
        binding = await self._write(
            f"activate {tenant}/{task}",
            lambda: self.store.activate(tenant, task, adapter, version, actor=actor,
                                        expected_revision=expected_revision))
        self._remember(binding, seen)
        return binding

    async def activate_generated(self, tenant: str, task: str, hypernet: str, version: int,
                                 hyper_task: str, *, actor: str,
                                 expected_revision: int | None = None) -> Binding:
        seen = self._invalidations
        binding = await self._write(
            f"activate {tenant}/{task}",
            lambda: self.store.activate_generated(tenant, task, hypernet, version,
                                                  hyper_task, actor=actor,
                                                  expected_revision=expected_revision))
        self._remember(binding, seen)
        return binding

    async def deactivate(self, tenant: str, task: str, *, actor: str,
                         expected_revision: int | None = None) -> int:
        revision = await self._write(
            f"deactivate {tenant}/{task}",
            lambda: self.store.deactivate(tenant, task, actor=actor,
                                          expected_revision=expected_revision))
        self._bindings.pop((tenant, task), None)
        return revision

    def _remember(self, binding: Binding, seen: int) -> None:
        key = (binding.tenant, binding.task)
        current = self._bindings.get(key)
        if current is None or current.value.revision < binding.revision:
            self._bindings[key] = _Entry(binding, fresh=seen == self._invalidations)

    async def put_adapter(self, tenant: str, name: str, *, method: str, format: str,
                          config: dict[str, Any], manifest: dict[str, Any], weights: bytes,
                          base_fingerprint: str, uploader: str,
                          metadata: dict[str, str] | None = None) -> AdapterVersion:
        """Upload a version. A bounded preflight makes it fail fast when Redis is down or
        hung; the upload itself has no overall deadline (a large one may legitimately
        take longer than ``deadline_s``; per-command socket timeouts still apply)."""
        await self._write(f"upload {tenant}/{name}", self.store.change_counter)
        record = await self.store.put_adapter(
            tenant, name, method=method, format=format, config=config, manifest=manifest,
            weights=weights, base_fingerprint=base_fingerprint, uploader=uploader,
            metadata=metadata)
        self._versions.put((tenant, name, record.version), record)
        return record

    # --- uncached records (bounded: an outage fails fast, as every call here does) -----
    async def create_tenant(self, name: str) -> tuple[Tenant, str]:
        return await self._write(f"create tenant {name}", lambda: self.store.create_tenant(name))

    async def list_adapters(self, tenant: str) -> list[str]:
        return await self._bounded(f"list adapters of {tenant}",
                                   lambda: self.store.list_adapters(tenant))

    async def list_versions(self, tenant: str, name: str) -> list[AdapterVersion]:
        return await self._bounded(f"list versions of {tenant}/{name}",
                                   lambda: self.store.list_versions(tenant, name))

    async def list_tasks(self, tenant: str) -> list[Binding]:
        return await self._bounded(f"list tasks of {tenant}",
                                   lambda: self.store.list_tasks(tenant))

    async def get_binding(self, tenant: str, task: str) -> Binding | None:
        """The task's binding as Redis has it now (uncached: admin reads, not serving)."""
        return await self._bounded(f"read task {tenant}/{task}",
                                   lambda: self.store.get_binding(tenant, task))

    async def task_revision(self, tenant: str, task: str) -> int:
        return await self._bounded(f"read task {tenant}/{task}",
                                   lambda: self.store.task_revision(tenant, task))

    async def list_hypernets(self, tenant: str) -> list[str]:
        return await self._bounded(f"list hypernetworks of {tenant}",
                                   lambda: self.store.list_hypernets(tenant))

    async def get_hypernet(self, tenant: str, name: str, version: int) -> HypernetVersion:
        return await self._bounded(f"read hypernetwork {tenant}/{name} v{version}",
                                   lambda: self.store.get_hypernet(tenant, name, version))

    async def list_hypernet_versions(self, tenant: str, name: str) -> list[HypernetVersion]:
        """Every version's record, oldest first (one deleted meanwhile is left out)."""

        async def read() -> list[HypernetVersion]:
            out = []
            for version in await self.store.list_hypernet_versions(tenant, name):
                try:
                    out.append(await self.store.get_hypernet(tenant, name, version))
                except NotFoundError:
                    continue
            return out

        return await self._bounded(f"list versions of hypernetwork {tenant}/{name}", read)

    async def delete_hypernet_version(self, tenant: str, name: str, version: int) -> None:
        await self._write(f"delete hypernetwork {tenant}/{name} v{version}",
                          lambda: self.store.delete_hypernet_version(tenant, name, version))

    async def delete_version(self, tenant: str, name: str, version: int) -> None:
        await self._write(f"delete {tenant}/{name} v{version}",
                          lambda: self.store.delete_version(tenant, name, version))
        self._versions.pop((tenant, name, version))
