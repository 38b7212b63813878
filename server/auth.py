"""Bearer-key authentication: tenant keys are looked up (hashed) through the store, the
admin key from the settings is compared in constant time. Typed dependencies for routes."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from tessera.server.http_errors import ApiError, unauthorized
from tessera.server.service import Service, get_service

ADMIN_DISABLED = ("admin endpoints are disabled: no admin key is configured (set "
                  "TESSERA_ADMIN_KEY)")


@dataclass(frozen=True)
class Principal:
    tenant: str | None
    admin: bool


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 512:
        return None
    return token


async def principal(request: Request,
                    service: Annotated[Service, Depends(get_service)]) -> Principal:
    token = bearer_token(request)
    if token is None:
        raise unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    admin_key = service.settings.admin_key
    if admin_key is not None and hmac.compare_digest(
            token.encode(), admin_key.get_secret_value().encode()):
        return Principal(tenant=None, admin=True)
    tenant = await service.store.tenant_for_key(token)
    if tenant is None:
        raise unauthorized("invalid API key")
    return Principal(tenant=tenant, admin=False)


async def require_tenant(who: Annotated[Principal, Depends(principal)]) -> str:
    if who.tenant is None:
        raise ApiError(403, "forbidden", "this endpoint needs a tenant API key")
    return who.tenant


async def require_admin(request: Request,
                        service: Annotated[Service, Depends(get_service)]) -> Principal:
    if service.settings.admin_key is None:
        # say why: no key can pass here, whatever the client sends
        raise unauthorized(ADMIN_DISABLED)
    who = await principal(request, service)
    if not who.admin:
        raise ApiError(403, "forbidden", "this endpoint needs the admin key")
    return who


TenantName = Annotated[str, Depends(require_tenant)]
Admin = Annotated[Principal, Depends(require_admin)]
