"""What every part of :class:`tessera.store.store.AdapterStore` shares: the connection, the key
builder, the settings, the blob layer, the scripts, and the commit loop."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from tessera.store import lua
from tessera.store.blobs import BlobRef, Blobs
from tessera.store.client import translate_errors
from tessera.store.errors import (
    ConflictError,
    NotFoundError,
    StoreFullError,
    StoreUnavailableError,
)
from tessera.store.keys import Keys
from tessera.store.settings import StoreSettings

log = logging.getLogger("store")

MAX_ATTEMPTS = 1000
"""Optimistic rounds before giving up (each lost round means another writer won)."""

Result = tuple[str, list[str]]


def decode_result(raw: Any) -> Result:
    items = [x.decode() if isinstance(x, bytes) else str(x) for x in raw]
    return items[0], items[1:]


def check_version(version: int) -> int:
    if isinstance(version, bool) or not isinstance(version, int):
        raise TypeError(f"version must be an int, not {type(version).__name__}")
    return version


def now() -> float:
    return time.time()


class StoreBase:
    """Holds the shared state; the concern mixins add the public methods."""

    def __init__(self, redis: Redis, keys: Keys, settings: StoreSettings) -> None:
        self._redis = redis
        self._keys = keys
        self._settings = settings
        self._blobs = Blobs(redis, keys, settings.chunk_bytes)
        script = redis.register_script
        self._create_tenant: AsyncScript = script(lua.CREATE_TENANT)
        self._add_api_key: AsyncScript = script(lua.ADD_API_KEY)
        self._revoke_api_key: AsyncScript = script(lua.REVOKE_API_KEY)
        self._delete_tenant: AsyncScript = script(lua.DELETE_TENANT)
        self._put_version: AsyncScript = script(lua.PUT_VERSION)
        self._delete_adapter_version: AsyncScript = script(lua.DELETE_ADAPTER_VERSION)
        self._activate: AsyncScript = script(lua.ACTIVATE)
        self._deactivate: AsyncScript = script(lua.DEACTIVATE)
        self._register_task: AsyncScript = script(lua.REGISTER_TASK)
        self._put_generated: AsyncScript = script(lua.PUT_GENERATED)
        self._delete_hypernet_version: AsyncScript = script(lua.DELETE_HYPERNET_VERSION)

    @property
    def keys(self) -> Keys:
        return self._keys

    @property
    def settings(self) -> StoreSettings:
        return self._settings

    async def _run(self, script: AsyncScript, keys: Sequence[str],
                   args: Sequence[str | int | float]) -> Result:
        return decode_result(await script(keys=list(keys), args=list(args)))

    async def _retrying(self, action: str,
                        attempt: Callable[[], Awaitable[Result]]) -> Result:
        """Run ``attempt`` until it answers anything but RETRY; Redis errors translated."""
        for _ in range(MAX_ATTEMPTS):
            with translate_errors(action):
                status, rest = await attempt()
            if status != "RETRY":
                return status, rest
        raise ConflictError(f"{action}: too many concurrent changes, try again")

    async def _commit_with_blob(self, action: str, data: bytes, sha256: str,
                                attempt: Callable[[BlobRef], Awaitable[Result]]) -> Result:
        """The upload loop of :mod:`tessera.store.blobs`: stage only when the blob is not stored
        (or vanished: NEED_DATA), retry on RETRY, drop unused staged chunks."""
        staged: BlobRef | None = None
        must_stage = False
        keep_staged = False  # consumed by the script, or Redis unreachable (TTL cleans up)
        try:
            for _ in range(MAX_ATTEMPTS):
                with translate_errors(action):
                    if staged is None and (must_stage or not await self._blobs.exists(sha256)):
                        staged = await self._blobs.stage(data, sha256)
                    ref = staged if staged is not None else self._blobs.unstaged(
                        sha256, len(data))
                    status, rest = await attempt(ref)
                if status == "NEED_DATA":
                    must_stage = True
                    if staged is not None:  # staged chunks expired before the commit
                        await self._blobs.discard_quietly(staged.staged)
                        staged = None
                    continue
                if status == "RETRY":
                    continue
                keep_staged = status in ("OK", "EXISTS")
                return status, rest
            raise ConflictError(f"{action}: too many concurrent changes, try again")
        except StoreUnavailableError as exc:
            # unreachable: don't spend another timeout on cleanup, the TTL does it;
            # full: do free what was staged
            keep_staged = not isinstance(exc, StoreFullError)
            raise
        finally:
            if staged is not None and not keep_staged:
                await self._blobs.discard_quietly(staged.staged)

    async def _put_versioned(self, action: str, where: VersionedPut, weights: bytes,
                             sha256: str, fields: Callable[[int], dict[str, str]],
                             event: Callable[[int], str]) -> int:
        """Commit the next version of ``where`` referencing ``weights``; its number."""
        k = self._keys
        version = 0
        token = uuid.uuid4().hex

        async def attempt(ref: BlobRef) -> Result:
            nonlocal version
            version = int(await self._redis.get(where.seq) or 0) + 1
            pairs = [x for item in fields(version).items() for x in item]
            return await self._run(
                self._put_version,
                [k.tenant(where.tenant), where.seq, where.versions,
                 where.version_key(version), where.names, k.changes(), *ref.keys(k)],
                [*ref.args(), version, where.name, k.events(), event(version), token,
                 *pairs])

        status, rest = await self._commit_with_blob(action, weights, sha256, attempt)
        raise_for(status, rest, action)
        return version


def raise_for(status: str, rest: list[str], what: str) -> None:
    """Turn a script's refusal into the typed error; return quietly on OK."""
    detail = rest[0] if rest else ""
    if status == "OK":
        return
    if status == "NOTFOUND":
        raise NotFoundError(f"{what}: {detail} not found")
    if status == "CONFLICT":
        raise ConflictError(f"{what}: {detail}")
    raise RuntimeError(f"{what}: unexpected script answer {status!r} {rest!r}")


class VersionedPut:
    """Where one kind of versioned object (adapter, hypernetwork) lives for one name."""

    def __init__(self, keys: Keys, kind: str, tenant: str, name: str) -> None:
        self.tenant = tenant
        self.name = name
        if kind == "adapter":
            self.seq = keys.adapter_seq(tenant, name)
            self.versions = keys.adapter_versions(tenant, name)
            self.names = keys.adapters(tenant)
            self._version = keys.adapter_version
        else:
            self.seq = keys.hypernet_seq(tenant, name)
            self.versions = keys.hypernet_versions(tenant, name)
            self.names = keys.hypernets(tenant)
            self._version = keys.hypernet_version

    def version_key(self, version: int) -> str:
        return self._version(self.tenant, self.name, version)
