"""Liveness and readiness."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from tessera.server.api.openapi import errors
from tessera.server.http_errors import error_body
from tessera.server.service import Service, get_service

router = APIRouter()
log = logging.getLogger(__name__)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)


@router.get("/readyz", response_model=None, responses=errors(503))
async def readyz(service: Annotated[Service, Depends(get_service)]
                 ) -> dict[str, Any] | JSONResponse:
    """Ready = the model is loaded and the engine loop beats; answered from memory (no
    queued generation, no Redis call), so probes cannot take tenant capacity and a Redis
    outage never takes a replica that still serves cached adapters out of its Service.
    ``store`` reports Redis health."""
    try:
        return service.ready()
    except Exception as exc:  # any failure means "not ready", reported, never raised
        log.warning("not ready", extra={"error": type(exc).__name__, "detail": str(exc)})
        return JSONResponse(error_body("not_ready", f"{type(exc).__name__}: {exc}"), 503)
