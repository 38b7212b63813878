"""Glue between the routes, the store and the engine.

* uploads: parse (``tessera.server.uploads``), decode and validate against the loaded base and
  the slot pool's limits in a worker thread, then store a new immutable version;
* inference: a model/task name -> the task's binding -> an :class:`AdapterSpec` whose key
  names the immutable version (and its weights) and whose loader reads the host cache /
  Redis through ``CachedStore.load_adapter``; a task bound to a HyperLoader task gets
  :meth:`tessera.server.hyperloader.HyperLoaderService.spec` (generated on first use).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import Request
from prometheus_client import CollectorRegistry

from tessera.adapters.method import Adapter
from tessera.engine.core import Engine
from tessera.engine.errors import EngineStoppedError
from tessera.engine.requests import AdapterSpec, GenerationRequest, RequestHandle
from tessera.engine.sampling import SamplingParams
from tessera.server.http_errors import not_found
from tessera.server.hyperloader import HyperLoaderService
from tessera.server.metrics import LoadSource, Metrics
from tessera.server.schemas import Activate
from tessera.server.server_settings import ServerSettings
from tessera.server.uploads import DecodedAdapter, Upload, decode, decoded
from tessera.store.models import AdapterVersion, Binding, HypernetVersion
from tessera.store.names import check_name
from tessera.store.resilient import CachedStore, weights_key


def decode_record(weights: bytes, record: AdapterVersion) -> DecodedAdapter:
    document = record.config if record.format == "peft" else record.manifest
    return decoded(decode(record.format, document, weights))


def decoded_size(value: Any) -> int:
    return int(value.nbytes)


class Service:
    def __init__(self, settings: ServerSettings, engine: Engine, store: CachedStore,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics(CollectorRegistry())
        self.engine = engine
        self.store = store
        self._fingerprint: str | None = None
        self._methods: dict[str, str] = {}  # adapter key -> method (one per stored version)
        self._models: dict[str, str] = {}  # adapter key -> the model name it was asked by
        self.hyper = HyperLoaderService(engine, store, self.base_fingerprint)

    @property
    def generations(self) -> int:
        """HyperLoader adapters this replica generated (for metrics)."""
        return self.hyper.generations

    # --- base ---------------------------------------------------------------------------
    @property
    def base_name(self) -> str:
        return self.engine.base.name

    def is_base(self, model: str) -> bool:
        return model in (self.settings.base_alias, self.base_name)

    def base_fingerprint(self) -> str:
        if self._fingerprint is None:
            config = self.engine.base.model.config.to_json_string()
            digest = hashlib.sha256(config.encode()).hexdigest()[:16]
            self._fingerprint = f"{self.base_name}:{digest}"
        return self._fingerprint

    # --- adapters -----------------------------------------------------------------------
    def _validate(self, upload: Upload) -> Adapter:
        """Decode and check against the base (runs in a worker thread), then lower it as a
        load would: a finite upload whose lowered tensors overflow is refused here (422),
        not on first use."""
        adapter = upload.decode()
        self.engine.check_adapter(adapter)
        return adapter

    async def upload(self, tenant: str, name: str, upload: Upload) -> AdapterVersion:
        check_name(name, "adapter")
        adapter = await asyncio.to_thread(self._validate, upload)
        is_peft = upload.format == "peft"
        method = ".".join(dict.fromkeys(adapter.methods))
        return await self.store.put_adapter(
            tenant, name, method=method, format=upload.format,
            config=upload.document if is_peft else {},
            manifest={} if is_peft else upload.document, weights=upload.weights,
            base_fingerprint=self.base_fingerprint(), uploader=tenant)

    async def activate(self, tenant: str, task: str, body: Activate) -> Binding:
        """Bind to an adapter version or to a HyperLoader task (one atomic step)."""
        if body.hypernetwork is not None:
            assert body.hyper_task is not None
            return await self.store.activate_generated(
                tenant, task, body.hypernetwork, body.version, body.hyper_task,
                actor=tenant, expected_revision=body.expected_revision)
        assert body.adapter is not None
        return await self.store.activate(tenant, task, body.adapter, body.version,
                                         actor=tenant,
                                         expected_revision=body.expected_revision)

    async def versions(self, tenant: str, name: str) -> list[AdapterVersion]:
        found = await self.store.list_versions(tenant, name)
        if not found:
            raise not_found(f"adapter {name!r} not found")
        return found

    async def hypernet_versions(self, tenant: str, name: str) -> list[HypernetVersion]:
        found = await self.store.list_hypernet_versions(tenant, name)
        if not found:
            raise not_found(f"hypernetwork {name!r} not found")
        return found

    async def task(self, tenant: str, task: str) -> Binding:
        check_name(task, "task")
        binding = await self.store.get_binding(tenant, task)
        if binding is None:
            raise not_found(f"task {task!r} not found")
        return binding

    # --- inference ----------------------------------------------------------------------
    async def adapter_for(self, tenant: str, model: str) -> AdapterSpec | None:
        """None for the base model; else the spec of the task's bound version."""
        if self.is_base(model):
            return None
        check_name(model, "task")
        binding = await self.store.resolve(tenant, model)
        if binding.hyper_task is not None:
            spec = self.hyper.spec(binding)
            self._methods[spec.key] = "hyperloader"
            return spec
        record = await self.store.get_version(tenant, binding.adapter, binding.version)
        store, metrics = self.store, self.metrics

        async def load() -> Adapter:  # runs only when the adapter is not on the device
            source: LoadSource = "host" if weights_key(record) in store.cache else "redis"
            start = time.monotonic()
            decoded: DecodedAdapter = await store.load_adapter(
                tenant, record.name, record.version, decode_record)
            metrics.observe_adapter_load(source=source, method=record.method,
                                         seconds=time.monotonic() - start)
            return decoded.adapter

        key = f"{tenant}/{record.name}@{record.version}:{record.sha256[:16]}"
        self._methods[key] = record.method
        return AdapterSpec(key, load)

    async def resolve(self, tenant: str, model: str) -> tuple[AdapterSpec | None, str | None]:
        """The adapter spec of ``model`` (None for the base) and its method (for metrics,
        known before the request is admitted, so rejections carry it too)."""
        spec = await self.adapter_for(tenant, model)
        if spec is None:
            return None, None
        self._models[spec.key] = model
        return spec, self._methods.get(spec.key)

    def model_of(self, key: str) -> str | None:
        """The ``model`` name requests used for adapter ``key`` (the name a router keys
        on); None for a key no request resolved."""
        return self._models.get(key)

    async def submit(self, spec: AdapterSpec | None, *, request_id: str,
                     prompt: str | Sequence[int] | None,
                     messages: Sequence[Mapping[str, str]] | None,
                     sampling: SamplingParams) -> RequestHandle:
        """Tokenize off the event loop (a large prompt must not stall other requests;
        its size is checked against the context before tokenizing), then queue under
        ``request_id`` (the response's id: one id in the API, the logs and the engine)."""
        request = GenerationRequest(prompt=prompt, messages=messages, adapter=spec,
                                    sampling=sampling, request_id=request_id)
        ids = await asyncio.to_thread(self.engine.prompt_ids, request)
        return self.engine.submit(dataclasses.replace(request, prompt=ids, messages=None))

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each token id's own text (special tokens included), as logprobs report them."""
        tokenizer = self.engine.base.tokenizer
        return [str(tokenizer.decode([i], skip_special_tokens=False)) for i in ids]

    def ready(self) -> dict[str, Any]:
        """Readiness without queueing work and without Redis: raises unless the model is
        loaded and the engine loop beats. Redis health is reported, never required (cached
        adapters keep serving while it is down)."""
        if not self.engine.alive():
            raise EngineStoppedError("the engine loop is not running or has stalled")
        return {"status": "ready", "model": self.base_name,
                "store": "ok" if self.store.available else "unavailable"}


def get_service(request: Request) -> Service:
    service = request.app.state.service
    assert isinstance(service, Service)
    return service
