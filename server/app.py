"""``create_app(settings)``: the FastAPI application.

The lifespan opens the store (:func:`tessera.store.open.open_store`: an embedded redis-server when
no URL is configured) and starts the engine, and on shutdown drains the engine, then closes
the store. An ``engine`` or ``store`` passed in belongs to the caller: it must already be
started and is not stopped here. ``app.state.engine`` (:class:`tessera.engine.core.Engine`),
``app.state.store`` (:class:`tessera.store.resilient.CachedStore`) and ``app.state.service`` are
set while the app runs (metrics read stats from them).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from tessera.engine.core import Engine
from tessera.server import http_errors
from tessera.server.api import hyper, infer, manage, openapi, ops
from tessera.server.limits import BodyLimit
from tessera.server.metrics import Metrics
from tessera.server.server_settings import ServerSettings
from tessera.server.service import Service, decoded_size
from tessera.store.open import StoreHandle, open_store

log = logging.getLogger(__name__)


def create_app(settings: ServerSettings, *, engine: Engine | None = None,
               store: StoreHandle | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            handle = store
            if handle is None:
                handle = await open_store(settings.store)
                stack.push_async_callback(handle.close)
            cached = handle.cached_store(decoded_size)
            await cached.start()
            stack.push_async_callback(cached.stop)
            eng = engine
            if eng is None:
                eng = Engine(settings.engine)
                await eng.start()
                stack.push_async_callback(eng.stop)  # drains in-flight requests first
            app.state.engine = eng
            app.state.owns_engine = engine is None  # drained by tessera.server.runner on shutdown
            app.state.store = cached
            app.state.store_handle = handle
            app.state.service = service = Service(settings, eng, cached, metrics)
            metrics.attach(eng, model_of=service.model_of)
            metrics.bind_host_cache(cached.cache.stats)
            metrics.bind_store(handle.embedded_stats, available=lambda: cached.available)
            service.hyper.on_generation.append(metrics.observe_generation)
            log.info("tessera serving", extra={"model": eng.base.name})
            yield
            log.info("tessera shutting down")

    docs = settings.api_docs
    app = FastAPI(title="tessera", version="0.1.0", lifespan=lifespan,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None)
    app.add_middleware(BodyLimit, max_request_bytes=settings.max_request_bytes,
                       max_upload_bytes=settings.max_upload_bytes)
    app.state.settings = settings
    app.state.metrics = metrics = Metrics(CollectorRegistry())
    http_errors.install(app)
    app.include_router(ops.router)
    app.include_router(manage.router)
    app.include_router(hyper.router)
    app.include_router(infer.router)
    openapi.document_limits(app, settings.engine)  # the configured limits, in the schema
    return app
