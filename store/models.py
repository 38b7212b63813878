"""What the store returns: frozen records, and their codec to and from Redis hashes.

Every record is immutable; a Redis hash is read with one command (HGETALL), so a record is
always decoded from one consistent state. JSON-valued fields (config, manifest, metadata)
are stored as compact JSON strings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

AdapterFormat = Literal["peft", "tessera"]
FORMATS: frozenset[str] = frozenset({"peft", "tessera"})
BindingAction = Literal["activate", "deactivate"]

# Event kinds published on ``Keys.events()`` (JSON: kind, tenant, name, version, revision).
TENANT_CREATED = "tenant.created"
TENANT_DELETED = "tenant.deleted"
APIKEY_ADDED = "apikey.added"
APIKEY_REVOKED = "apikey.revoked"
ADAPTER_PUT = "adapter.put"
ADAPTER_DELETED = "adapter.deleted"
TASK_ACTIVATED = "task.activated"
TASK_DEACTIVATED = "task.deactivated"
HYPERNET_PUT = "hypernet.put"
HYPERNET_DELETED = "hypernet.deleted"
HYPERNET_TASK_REGISTERED = "hypernet.task_registered"
GENERATED_PUT = "generated.put"


def event_json(kind: str, tenant: str, name: str | None = None, version: int | None = None,
               revision: int | None = None) -> str:
    """The pub/sub payload (task events are built by the same shape inside Lua)."""
    return json.dumps({"kind": kind, "tenant": tenant, "name": name, "version": version,
                       "revision": revision}, separators=(",", ":"))


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


RawHash = Mapping[bytes | str, bytes | str]
"""A hash as redis-py returns it (bytes with ``decode_responses=False``)."""


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def as_int(value: object) -> int:
    """An integer reply element (bytes, str or int) as int."""
    if isinstance(value, bytes | str | int):
        return int(value)
    raise TypeError(f"not an integer reply: {value!r}")


def _text(raw: RawHash, name: str) -> str:
    value = raw.get(name.encode())
    return text(value if value is not None else raw[name])


def _optional_text(raw: RawHash, name: str) -> str | None:
    value = raw.get(name.encode(), raw.get(name))
    return text(value) if value else None


def _json_dict(raw: RawHash, name: str) -> dict[str, Any]:
    return cast(dict[str, Any], json.loads(_text(raw, name)))


@dataclass(frozen=True)
class Tenant:
    name: str
    created: float

    @classmethod
    def from_hash(cls, raw: RawHash) -> Tenant:
        return cls(name=_text(raw, "name"), created=float(_text(raw, "created")))


@dataclass(frozen=True)
class AdapterVersion:
    """One immutable uploaded adapter version; ``sha256`` names its weights blob."""

    tenant: str
    name: str
    version: int
    method: str
    format: AdapterFormat
    config: dict[str, Any]
    manifest: dict[str, Any]
    base_fingerprint: str
    sha256: str
    size: int
    created: float
    uploader: str
    metadata: dict[str, str] = field(default_factory=dict)

    def to_hash(self) -> dict[str, str]:
        return {"tenant": self.tenant, "name": self.name, "version": str(self.version),
                "method": self.method, "format": self.format, "config": dumps(self.config),
                "manifest": dumps(self.manifest), "base_fingerprint": self.base_fingerprint,
                "sha256": self.sha256, "size": str(self.size), "created": repr(self.created),
                "uploader": self.uploader, "metadata": dumps(self.metadata)}

    @classmethod
    def from_hash(cls, raw: RawHash) -> AdapterVersion:
        return cls(tenant=_text(raw, "tenant"), name=_text(raw, "name"),
                   version=int(_text(raw, "version")), method=_text(raw, "method"),
                   format=cast(AdapterFormat, _text(raw, "format")),
                   config=_json_dict(raw, "config"), manifest=_json_dict(raw, "manifest"),
                   base_fingerprint=_text(raw, "base_fingerprint"),
                   sha256=_text(raw, "sha256"), size=int(_text(raw, "size")),
                   created=float(_text(raw, "created")), uploader=_text(raw, "uploader"),
                   metadata=cast(dict[str, str], _json_dict(raw, "metadata")))


@dataclass(frozen=True)
class Binding:
    """task -> adapter version; ``revision`` grows by one on every activate/deactivate.

    With ``hyper_task`` set the task is bound to a HyperLoader task instead: ``adapter``
    and ``version`` then name the hypernetwork version that generates its adapter."""

    tenant: str
    task: str
    adapter: str
    version: int
    revision: int
    updated: float
    actor: str
    hyper_task: str | None = None

    @classmethod
    def from_hash(cls, raw: RawHash) -> Binding | None:
        """``None`` for a task that is not bound (never, or deactivated)."""
        if not raw.get(b"adapter") and not raw.get("adapter"):
            return None
        return cls(tenant=_text(raw, "tenant"), task=_text(raw, "task"),
                   adapter=_text(raw, "adapter"), version=int(_text(raw, "version")),
                   revision=int(_text(raw, "revision")), updated=float(_text(raw, "updated")),
                   actor=_text(raw, "actor"),
                   hyper_task=_optional_text(raw, "hyper_task"))


@dataclass(frozen=True)
class BindingChange:
    """One history entry: the binding after the change (``adapter``/``version`` are None
    after a deactivate) and what it replaced."""

    tenant: str
    task: str
    action: BindingAction
    adapter: str | None
    version: int | None
    revision: int
    updated: float
    actor: str
    previous_adapter: str | None
    previous_version: int | None

    @classmethod
    def from_json(cls, raw: bytes | str) -> BindingChange:
        doc = json.loads(raw)

        def opt_int(value: Any) -> int | None:
            return None if value in (None, "") else int(value)

        def opt_str(value: Any) -> str | None:
            return None if value in (None, "") else str(value)

        return cls(tenant=str(doc["tenant"]), task=str(doc["task"]),
                   action=cast(BindingAction, doc["action"]),
                   adapter=opt_str(doc.get("adapter")), version=opt_int(doc.get("version")),
                   revision=int(doc["revision"]), updated=float(doc["updated"]),
                   actor=str(doc["actor"]),
                   previous_adapter=opt_str(doc.get("previous_adapter")),
                   previous_version=opt_int(doc.get("previous_version")))


@dataclass(frozen=True)
class HypernetVersion:
    """One immutable HyperLoader hypernetwork version and the tasks registered on it."""

    tenant: str
    name: str
    version: int
    format: AdapterFormat
    config: dict[str, Any]
    manifest: dict[str, Any]
    base_fingerprint: str
    sha256: str
    size: int
    created: float
    uploader: str
    metadata: dict[str, str] = field(default_factory=dict)
    tasks: tuple[str, ...] = ()

    def to_hash(self) -> dict[str, str]:
        return {"tenant": self.tenant, "name": self.name, "version": str(self.version),
                "format": self.format, "config": dumps(self.config),
                "manifest": dumps(self.manifest), "base_fingerprint": self.base_fingerprint,
                "sha256": self.sha256, "size": str(self.size), "created": repr(self.created),
                "uploader": self.uploader, "metadata": dumps(self.metadata)}

    @classmethod
    def from_hash(cls, raw: RawHash, tasks: tuple[str, ...]) -> HypernetVersion:
        return cls(tenant=_text(raw, "tenant"), name=_text(raw, "name"),
                   version=int(_text(raw, "version")),
                   format=cast(AdapterFormat, _text(raw, "format")),
                   config=_json_dict(raw, "config"), manifest=_json_dict(raw, "manifest"),
                   base_fingerprint=_text(raw, "base_fingerprint"),
                   sha256=_text(raw, "sha256"), size=int(_text(raw, "size")),
                   created=float(_text(raw, "created")), uploader=_text(raw, "uploader"),
                   metadata=cast(dict[str, str], _json_dict(raw, "metadata")), tasks=tasks)


@dataclass(frozen=True)
class GeneratedEntry:
    """Adapter weights a hypernetwork version generated for one task (cached, immutable)."""

    tenant: str
    hypernet: str
    version: int
    task: str
    sha256: str
    size: int
    created: float

    def to_hash(self) -> dict[str, str]:
        return {"tenant": self.tenant, "hypernet": self.hypernet, "version": str(self.version),
                "task": self.task, "sha256": self.sha256, "size": str(self.size),
                "created": repr(self.created)}

    @classmethod
    def from_hash(cls, raw: RawHash) -> GeneratedEntry:
        return cls(tenant=_text(raw, "tenant"), hypernet=_text(raw, "hypernet"),
                   version=int(_text(raw, "version")), task=_text(raw, "task"),
                   sha256=_text(raw, "sha256"), size=int(_text(raw, "size")),
                   created=float(_text(raw, "created")))
