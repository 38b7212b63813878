"""Task -> adapter-version bindings: atomic activate/deactivate with compare-and-set.

A binding is one Redis hash written by one HSET inside one Lua script (with the history
entry, the bound-version reference count, the change counter and the event), and read with
one HGETALL: a reader sees the old binding or the new one, never a mix. ``revision`` starts
at 0 for a task never bound and grows by one per change; it survives deactivation, so
``expected_revision`` is unambiguous (no ABA). ``expected_revision=0`` means "only if this
task has never been bound".
"""

from __future__ import annotations

import logging
import uuid

from tessera.store.base import StoreBase, check_version, now, raise_for
from tessera.store.client import translate_errors
from tessera.store.errors import NotFoundError
from tessera.store.models import Binding, BindingChange, text
from tessera.store.names import check_name

log = logging.getLogger("tessera.store.tasks")


def _expected(expected_revision: int | None) -> str:
    if expected_revision is None:
        return ""
    return str(check_version(expected_revision))


class TaskOps(StoreBase):
    async def activate(self, tenant: str, task: str, adapter: str, version: int, *,
                       actor: str, expected_revision: int | None = None) -> Binding:
        """Bind ``task`` to ``adapter`` ``version`` (NotFoundError if that version does not
        exist for this tenant; ConflictError if ``expected_revision`` is stale)."""
        check_name(adapter, "adapter")
        k = self._keys
        return await self._bind(
            tenant, task, adapter, version, actor=actor, expected_revision=expected_revision,
            target_keys=[k.adapter_version(tenant, adapter, version)],
            ref=k.binding_ref(adapter, version), hyper_task=None)

    async def activate_generated(self, tenant: str, task: str, hypernet: str, version: int,
                                 hyper_task: str, *, actor: str,
                                 expected_revision: int | None = None) -> Binding:
        """Bind ``task`` to HyperLoader task ``hyper_task`` of hypernetwork ``hypernet``
        ``version`` (NotFoundError unless that version exists with that task registered).
        The same atomic script as :meth:`activate`; the version is counted in the task
        refs, so deleting it is a ConflictError while bound."""
        check_name(hypernet, "hypernetwork")
        check_name(hyper_task, "task")
        k = self._keys
        return await self._bind(
            tenant, task, hypernet, version, actor=actor, expected_revision=expected_revision,
            target_keys=[k.hypernet_version(tenant, hypernet, version),
                         k.hypernet_tasks(tenant, hypernet, version)],
            ref=k.hypernet_binding_ref(hypernet, version), hyper_task=hyper_task)

    async def _bind(self, tenant: str, task: str, target: str, version: int, *, actor: str,
                    expected_revision: int | None, target_keys: list[str], ref: str,
                    hyper_task: str | None) -> Binding:
        """The one activate script for both kinds of binding (adapter version, or a
        hypernetwork version's task when ``hyper_task`` is given)."""
        check_name(tenant, "tenant")
        check_name(task, "task")
        check_version(version)
        k = self._keys
        updated = repr(now())
        args: list[str | int] = [tenant, task, actor, updated, _expected(expected_revision),
                                 self._settings.history_limit, k.events(), target, version,
                                 ref, uuid.uuid4().hex]
        if hyper_task is not None:
            args.append(hyper_task)
        with translate_errors(f"activate {tenant}/{task}"):
            status, rest = await self._run(
                self._activate,
                [k.task(tenant, task), k.task_history(tenant, task), k.tasks(tenant),
                 k.task_refs(tenant), k.changes(), k.tenant(tenant), *target_keys],
                args)
        if status == "CONFLICT":
            rest = [f"expected revision {expected_revision}, the task is at {rest[0]}"]
        raise_for(status, rest, f"task {task!r}")
        revision = int(rest[0])
        log.info("task activated", extra={"tenant": tenant, "task": task, "target": target,
                                          "version": version, "hyper_task": hyper_task,
                                          "revision": revision, "actor": actor})
        return Binding(tenant=tenant, task=task, adapter=target, version=version,
                       revision=revision, updated=float(updated), actor=actor,
                       hyper_task=hyper_task)

    async def deactivate(self, tenant: str, task: str, *, actor: str,
                         expected_revision: int | None = None) -> int:
        """Unbind ``task``; returns the new revision. NotFoundError when it is not bound."""
        check_name(tenant, "tenant")
        check_name(task, "task")
        k = self._keys
        with translate_errors(f"deactivate {tenant}/{task}"):
            status, rest = await self._run(
                self._deactivate,
                [k.task(tenant, task), k.task_history(tenant, task), k.tasks(tenant),
                 k.task_refs(tenant), k.changes()],
                [tenant, task, actor, repr(now()), _expected(expected_revision),
                 self._settings.history_limit, k.events(), uuid.uuid4().hex])
        if status == "CONFLICT":
            rest = [f"expected revision {expected_revision}, the task is at {rest[0]}"]
        raise_for(status, rest, f"task {task!r}")
        revision = int(rest[0])
        log.info("task deactivated", extra={"tenant": tenant, "task": task,
                                            "revision": revision, "actor": actor})
        return revision

    async def get_binding(self, tenant: str, task: str) -> Binding | None:
        """The task's current binding (one atomic read), or None when it is not bound --
        also when the task belongs to another tenant."""
        check_name(tenant, "tenant")
        check_name(task, "task")
        with translate_errors("get binding"):
            raw = await self._redis.hgetall(self._keys.task(tenant, task))
        return Binding.from_hash(raw)

    async def task_revision(self, tenant: str, task: str) -> int:
        """Current revision (0: never bound); what ``expected_revision`` compares with."""
        check_name(tenant, "tenant")
        check_name(task, "task")
        with translate_errors("get task revision"):
            raw = await self._redis.hget(self._keys.task(tenant, task), "revision")
        return int(raw) if raw is not None else 0

    async def task_history(self, tenant: str, task: str,
                           limit: int | None = None) -> list[BindingChange]:
        """Changes newest first (at most ``limit``; the store keeps ``history_limit``)."""
        check_name(tenant, "tenant")
        check_name(task, "task")
        if limit is not None and limit <= 0:
            return []
        stop = -1 if limit is None else limit - 1
        with translate_errors("get task history"):
            raws = await self._redis.lrange(self._keys.task_history(tenant, task), 0, stop)
        return [BindingChange.from_json(raw) for raw in raws]

    async def list_tasks(self, tenant: str) -> list[Binding]:
        """The tenant's bound tasks, sorted by name (one consistent snapshot)."""
        check_name(tenant, "tenant")
        k = self._keys
        with translate_errors("list tasks"):
            names = sorted(text(m) for m in await self._redis.smembers(k.tasks(tenant)))
            async with self._redis.pipeline(transaction=True) as pipe:
                for name in names:
                    pipe.hgetall(k.task(tenant, name))
                raws = await pipe.execute()
        bindings = (Binding.from_hash(raw) for raw in raws)
        return [b for b in bindings if b is not None]

    async def require_binding(self, tenant: str, task: str) -> Binding:
        """Like :meth:`get_binding`, NotFoundError instead of None."""
        binding = await self.get_binding(tenant, task)
        if binding is None:
            raise NotFoundError(f"task {task!r} not found")
        return binding
