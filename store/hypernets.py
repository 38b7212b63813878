"""HyperLoader: hypernetwork versions, their registered task embeddings, and the cache of
adapters they generated per (hypernetwork version, task).

Versions follow the adapter rules (immutable, numbered, blobs content-addressed). A task
is registered once per hypernetwork version: re-registering would make generated entries
stale, so it is a ConflictError (register the new embedding under a new task name or a new
hypernetwork version). Generated entries are first-writer-wins: concurrent generators of
the same (version, task) all get the one entry that was stored first.
"""

from __future__ import annotations

import logging
from typing import Any

from tessera.store.adapters import check_format, check_metadata
from tessera.store.base import StoreBase, VersionedPut, check_version, now, raise_for
from tessera.store.blobs import digest
from tessera.store.client import translate_errors
from tessera.store.errors import NotFoundError
from tessera.store.models import (
    GENERATED_PUT,
    HYPERNET_DELETED,
    HYPERNET_PUT,
    HYPERNET_TASK_REGISTERED,
    GeneratedEntry,
    HypernetVersion,
    as_int,
    event_json,
    text,
)
from tessera.store.names import check_name

log = logging.getLogger("tessera.store.hypernets")


def _check(tenant: str, name: str, version: int, *tasks: str) -> None:
    check_name(tenant, "tenant")
    check_name(name, "hypernetwork")
    check_version(version)
    for task in tasks:
        check_name(task, "task")


class HypernetOps(StoreBase):
    async def put_hypernet(self, tenant: str, name: str, *, config: dict[str, Any],
                           manifest: dict[str, Any], weights: bytes, base_fingerprint: str,
                           uploader: str, format: str = "tessera",
                           metadata: dict[str, str] | None = None) -> HypernetVersion:
        check_name(tenant, "tenant")
        check_name(name, "hypernetwork")
        fmt = check_format(format)
        meta = check_metadata(metadata)
        weights = bytes(weights)
        sha = await digest(weights)
        created = now()

        def record(version: int) -> HypernetVersion:
            return HypernetVersion(tenant=tenant, name=name, version=version, format=fmt,
                                   config=config, manifest=manifest,
                                   base_fingerprint=base_fingerprint, sha256=sha,
                                   size=len(weights), created=created, uploader=uploader,
                                   metadata=meta)

        version = await self._put_versioned(
            f"put hypernetwork {tenant}/{name}",
            VersionedPut(self._keys, "hypernet", tenant, name), weights, sha,
            lambda v: record(v).to_hash(), lambda v: event_json(HYPERNET_PUT, tenant, name, v))
        log.info("hypernetwork version stored", extra={"tenant": tenant, "hypernet": name,
                                                       "version": version, "sha256": sha})
        return record(version)

    async def get_hypernet(self, tenant: str, name: str, version: int) -> HypernetVersion:
        _check(tenant, name, version)
        k = self._keys
        with translate_errors("get hypernetwork"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(k.hypernet_version(tenant, name, version))
                pipe.hkeys(k.hypernet_tasks(tenant, name, version))
                raw, tasks = await pipe.execute()
        if not raw:
            raise NotFoundError(f"hypernetwork {name!r} version {version} not found")
        return HypernetVersion.from_hash(raw, tuple(sorted(text(t) for t in tasks)))

    async def get_hypernet_weights(self, tenant: str, name: str, version: int) -> bytes:
        record = await self.get_hypernet(tenant, name, version)
        return await self._read_blob(record.sha256, f"hypernetwork {name!r} v{version}")

    async def list_hypernets(self, tenant: str) -> list[str]:
        check_name(tenant, "tenant")
        with translate_errors("list hypernetworks"):
            members = await self._redis.smembers(self._keys.hypernets(tenant))
        return sorted(text(m) for m in members)

    async def list_hypernet_versions(self, tenant: str, name: str) -> list[int]:
        check_name(tenant, "tenant")
        check_name(name, "hypernetwork")
        with translate_errors("list hypernetwork versions"):
            raw = await self._redis.zrange(self._keys.hypernet_versions(tenant, name), 0, -1)
        return [as_int(v) for v in raw]

    async def delete_hypernet_version(self, tenant: str, name: str, version: int) -> None:
        """Delete a hypernetwork version with its registered task embeddings and the
        adapters generated from it; each blob goes when nothing else references it.
        ConflictError while a task is bound to one of its tasks."""
        _check(tenant, name, version)
        k = self._keys
        key, tasks_key = k.hypernet_version(tenant, name, version), k.hypernet_tasks(
            tenant, name, version)

        async def attempt() -> tuple[str, list[str]]:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hget(key, "sha256")
                pipe.hgetall(tasks_key)
                raw_sha, raw_tasks = await pipe.execute()
            if raw_sha is None:
                return "NOTFOUND", [f"version {version}"]
            embeddings = {text(t): text(s) for t, s in raw_tasks.items()}
            tasks = sorted(embeddings)
            gen_keys = [k.generated(tenant, name, version, t) for t in tasks]
            async with self._redis.pipeline(transaction=False) as pipe:
                for g in gen_keys:
                    pipe.hget(g, "sha256")
                generated = ["" if g is None else text(g) for g in await pipe.execute()]
            release = await self._blobs.chunk_counts(
                [text(raw_sha), *(embeddings[t] for t in tasks), *(g for g in generated if g)])
            return await self._run(
                self._delete_hypernet_version,
                [key, k.hypernet_versions(tenant, name), k.hypernets(tenant), tasks_key,
                 k.changes(), *gen_keys, *release.keys(k), k.task_refs(tenant)],
                [*release.args(), version, name, text(raw_sha), len(tasks), k.events(),
                 event_json(HYPERNET_DELETED, tenant, name, version), *tasks,
                 *(embeddings[t] for t in tasks), *generated,
                 k.hypernet_binding_ref(name, version)])

        status, rest = await self._retrying(f"delete hypernetwork {tenant}/{name}", attempt)
        raise_for(status, rest, f"hypernetwork {name!r}")
        log.info("hypernetwork version deleted", extra={"tenant": tenant, "hypernet": name,
                                                        "version": version})

    async def register_task(self, tenant: str, name: str, version: int, task: str,
                            embedding: bytes) -> None:
        """Register ``task``'s learned embedding on one hypernetwork version (once)."""
        _check(tenant, name, version, task)
        k = self._keys
        embedding = bytes(embedding)
        sha = await digest(embedding)
        event = event_json(HYPERNET_TASK_REGISTERED, tenant, name, version)
        status, rest = await self._commit_with_blob(
            f"register task {tenant}/{name}/{task}", embedding, sha,
            lambda ref: self._run(
                self._register_task,
                [k.hypernet_version(tenant, name, version),
                 k.hypernet_tasks(tenant, name, version), k.changes(), *ref.keys(k)],
                [*ref.args(), task, k.events(), event]))
        raise_for(status, rest, f"hypernetwork {name!r} version {version} task {task!r}")
        log.info("hypernetwork task registered", extra={"tenant": tenant, "hypernet": name,
                                                        "version": version, "task": task})

    async def get_task_embedding(self, tenant: str, name: str, version: int,
                                 task: str) -> bytes:
        _check(tenant, name, version, task)
        with translate_errors("get task embedding"):
            sha = await self._redis.hget(self._keys.hypernet_tasks(tenant, name, version), task)
        if sha is None:
            raise NotFoundError(f"task {task!r} is not registered on {name!r} v{version}")
        return await self._read_blob(text(sha), f"embedding of task {task!r}")

    async def list_hypernet_tasks(self, tenant: str, name: str, version: int) -> list[str]:
        _check(tenant, name, version)
        with translate_errors("list hypernetwork tasks"):
            raw = await self._redis.hkeys(self._keys.hypernet_tasks(tenant, name, version))
        return sorted(text(t) for t in raw)

    async def get_generated(self, tenant: str, name: str, version: int,
                            task: str) -> GeneratedEntry | None:
        _check(tenant, name, version, task)
        with translate_errors("get generated adapter"):
            raw = await self._redis.hgetall(self._keys.generated(tenant, name, version, task))
        return GeneratedEntry.from_hash(raw) if raw else None

    async def put_generated(self, tenant: str, name: str, version: int, task: str,
                            weights: bytes) -> GeneratedEntry:
        """Cache what ``name`` v``version`` generated for ``task``. First writer wins: the
        entry returned is the one stored, which may be another writer's."""
        _check(tenant, name, version, task)
        k = self._keys
        weights = bytes(weights)
        sha = await digest(weights)
        entry = GeneratedEntry(tenant=tenant, hypernet=name, version=version, task=task,
                               sha256=sha, size=len(weights), created=now())
        pairs = [x for item in entry.to_hash().items() for x in item]
        event = event_json(GENERATED_PUT, tenant, name, version)
        status, rest = await self._commit_with_blob(
            f"put generated {tenant}/{name}/{task}", weights, sha,
            lambda ref: self._run(
                self._put_generated,
                [k.hypernet_tasks(tenant, name, version),
                 k.generated(tenant, name, version, task), k.changes(), *ref.keys(k)],
                [*ref.args(), task, k.events(), event, *pairs]))
        if status == "EXISTS":
            winner = await self.get_generated(tenant, name, version, task)
            if winner is None:  # pragma: no cover - entries are never deleted
                raise NotFoundError(f"generated entry for task {task!r} vanished")
            return winner
        raise_for(status, rest, f"hypernetwork {name!r} version {version} task {task!r}")
        log.info("generated adapter cached", extra={"tenant": tenant, "hypernet": name,
                                                    "version": version, "task": task})
        return entry

    async def get_generated_weights(self, tenant: str, name: str, version: int,
                                    task: str) -> bytes:
        entry = await self.get_generated(tenant, name, version, task)
        if entry is None:
            raise NotFoundError(f"no generated adapter for task {task!r}")
        return await self._read_blob(entry.sha256, f"generated adapter of task {task!r}")

    async def _read_blob(self, sha256: str, what: str) -> bytes:
        with translate_errors(f"read {what}"):
            try:
                return await self._blobs.read(sha256)
            except NotFoundError:
                raise NotFoundError(f"{what} not found") from None
