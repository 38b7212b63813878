"""Every Redis key and channel tessera uses, built here and nowhere else.

Layout (``P`` = ``<prefix>:v<SCHEMA_VERSION>``; names pass :func:`tessera.store.names.check_name`
first, so they never contain ``:``)::

    P:changes                                   INCR counter, bumped by every mutation
    P:events                                    pub/sub channel (JSON change events)
    P:tenants                                   SET of tenant names
    P:tenant:{tenant}                           HASH tenant record
    P:tenant:{tenant}:apikeys                   SET sha256 hex of the tenant's API keys
    P:apikey:{sha256 hex}                       STRING tenant name (API keys stored hashed)
    P:upload:{upload id}:{i}                    STRING staged chunk i of an upload (TTL)
    P:blob:{sha256}                             HASH size, chunks, refs
    P:blob:{sha256}:{i}                         STRING chunk i of the blob's bytes
    P:adapters:{tenant}                         SET adapter names of a tenant
    P:adapter:{tenant}:{name}:seq               INCR next version number
    P:adapter:{tenant}:{name}:versions          ZSET version -> version (ordered)
    P:adapter:{tenant}:{name}:v:{version}       HASH immutable version manifest
    P:tasks:{tenant}                            SET task names of a tenant
    P:task:{tenant}:{task}                      HASH binding (adapter, version, revision, ...)
    P:task:{tenant}:{task}:history              LIST JSON binding changes, newest first
    P:taskrefs:{tenant}                         HASH "{adapter}/{version}" -> bound tasks
                                                (and "hypernet/{name}/{version}")
    P:hypernets:{tenant}                        SET hypernetwork names
    P:hypernet:{tenant}:{name}:seq              INCR next version
    P:hypernet:{tenant}:{name}:versions         ZSET versions
    P:hypernet:{tenant}:{name}:v:{version}      HASH hypernetwork version manifest
    P:hypernet:{tenant}:{name}:v:{version}:tasks  HASH task -> embedding blob sha256
    P:generated:{tenant}:{name}:{version}:{task}  HASH generated adapter cache entry

Bumping :data:`SCHEMA_VERSION` moves tessera to a fresh key space.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Keys:
    """Key builder for one key-space prefix (tests use a unique prefix per test)."""

    prefix: str = "tessera"

    @property
    def root(self) -> str:
        return f"{self.prefix}:v{SCHEMA_VERSION}"

    # --- global -------------------------------------------------------------------------
    def changes(self) -> str:
        return f"{self.root}:changes"

    def events(self) -> str:
        return f"{self.root}:events"

    # --- tenants ------------------------------------------------------------------------
    def tenants(self) -> str:
        return f"{self.root}:tenants"

    def tenant(self, tenant: str) -> str:
        return f"{self.root}:tenant:{tenant}"

    def tenant_api_keys(self, tenant: str) -> str:
        return f"{self.root}:tenant:{tenant}:apikeys"

    def api_key(self, key_hash: str) -> str:
        return f"{self.root}:apikey:{key_hash}"

    # --- blobs --------------------------------------------------------------------------
    def blob(self, sha256: str) -> str:
        return f"{self.root}:blob:{sha256}"

    def blob_chunk(self, sha256: str, index: int) -> str:
        return f"{self.root}:blob:{sha256}:{index}"

    def blob_chunk_pattern(self, sha256: str) -> str:
        """SCAN pattern matching every chunk key of one blob (tests, diagnostics)."""
        return f"{self.root}:blob:{sha256}:*"

    def upload_chunk(self, upload_id: str, index: int) -> str:
        return f"{self.root}:upload:{upload_id}:{index}"

    # --- adapters -----------------------------------------------------------------------
    def adapters(self, tenant: str) -> str:
        return f"{self.root}:adapters:{tenant}"

    def adapter_seq(self, tenant: str, name: str) -> str:
        return f"{self.root}:adapter:{tenant}:{name}:seq"

    def adapter_versions(self, tenant: str, name: str) -> str:
        return f"{self.root}:adapter:{tenant}:{name}:versions"

    def adapter_version(self, tenant: str, name: str, version: int) -> str:
        return f"{self.root}:adapter:{tenant}:{name}:v:{version}"

    # --- tasks --------------------------------------------------------------------------
    def tasks(self, tenant: str) -> str:
        return f"{self.root}:tasks:{tenant}"

    def task(self, tenant: str, task: str) -> str:
        return f"{self.root}:task:{tenant}:{task}"

    def task_history(self, tenant: str, task: str) -> str:
        return f"{self.root}:task:{tenant}:{task}:history"

    def task_refs(self, tenant: str) -> str:
        return f"{self.root}:taskrefs:{tenant}"

    @staticmethod
    def binding_ref(adapter: str, version: int) -> str:
        """Field of :meth:`task_refs` counting the tasks bound to one adapter version."""
        return f"{adapter}/{version}"

    # --- hypernetworks ------------------------------------------------------------------
    def hypernets(self, tenant: str) -> str:
        return f"{self.root}:hypernets:{tenant}"

    def hypernet_seq(self, tenant: str, name: str) -> str:
        return f"{self.root}:hypernet:{tenant}:{name}:seq"

    def hypernet_versions(self, tenant: str, name: str) -> str:
        return f"{self.root}:hypernet:{tenant}:{name}:versions"

    def hypernet_version(self, tenant: str, name: str, version: int) -> str:
        return f"{self.root}:hypernet:{tenant}:{name}:v:{version}"

    def hypernet_tasks(self, tenant: str, name: str, version: int) -> str:
        return f"{self.root}:hypernet:{tenant}:{name}:v:{version}:tasks"

    @staticmethod
    def hypernet_binding_ref(name: str, version: int) -> str:
        """Field of :meth:`task_refs` counting the tasks bound to one hypernetwork version
        (names hold no ``/``: never equal to a :meth:`binding_ref`)."""
        return f"hypernet/{name}/{version}"

    def generated(self, tenant: str, name: str, version: int, task: str) -> str:
        return f"{self.root}:generated:{tenant}:{name}:{version}:{task}"
