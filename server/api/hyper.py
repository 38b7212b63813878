"""HyperLoader hypernetworks (tenant-scoped): upload, list, get (every version, or one),
register a task embedding, delete a version. Binding a task to a HyperLoader task is
``activate`` with ``hypernetwork`` + ``version`` + ``hyper_task`` (server/api/manage.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from tessera.server.api.openapi import AUTHENTICATED, errors, multipart
from tessera.server.auth import TenantName
from tessera.server.schemas import (
    HypernetList,
    HypernetOut,
    HypernetParam,
    HypernetVersions,
    TaskParam,
    VersionParam,
)
from tessera.server.service import Service, get_service
from tessera.server.uploads import only_fields, read_form, required_part

router = APIRouter(prefix="/v1/hypernetworks", responses=AUTHENTICATED)
Svc = Annotated[Service, Depends(get_service)]
HYPERNET_UPLOAD = multipart(
    {"manifest": "the tessera hypernetwork manifest (JSON)",
     "weights": "the weights as safetensors (pickle-based files are refused: 415)"},
    description="a new immutable hypernetwork version")
EMBEDDING_UPLOAD = multipart(
    {"embedding": "a safetensors file holding one tensor [task_dim]"},
    description="the task embedding")


@router.post("/{name}", status_code=201, responses=errors(400, 409, 413, 415, 422),
             openapi_extra=HYPERNET_UPLOAD)
async def upload_hypernetwork(name: HypernetParam, request: Request, tenant: TenantName,
                              service: Svc) -> HypernetOut:
    """multipart ``manifest`` (tessera hypernetwork manifest JSON) + ``weights``."""
    form = await read_form(request, service.settings.max_upload_bytes)
    try:
        only_fields(form, ("manifest", "weights"))
        manifest = await required_part(form, "manifest")
        weights = await required_part(form, "weights", weights=True)
    finally:
        await form.close()
    return HypernetOut.of(await service.hyper.upload(tenant, name, manifest, weights))


@router.get("")
async def list_hypernetworks(tenant: TenantName, service: Svc) -> HypernetList:
    return HypernetList(hypernetworks=await service.store.list_hypernets(tenant))


@router.get("/{name}", responses=errors(400, 404, 422))
async def get_hypernetwork_versions(name: HypernetParam, tenant: TenantName,
                                    service: Svc) -> HypernetVersions:
    """Every stored version of the hypernetwork, oldest first."""
    versions = await service.hypernet_versions(tenant, name)
    return HypernetVersions(name=name, versions=[HypernetOut.of(v) for v in versions])


@router.get("/{name}/versions/{version}", responses=errors(400, 404, 422))
async def get_hypernetwork(name: HypernetParam, version: VersionParam, tenant: TenantName,
                           service: Svc) -> HypernetOut:
    return HypernetOut.of(await service.store.get_hypernet(tenant, name, version))


@router.post("/{name}/versions/{version}/tasks/{task}", status_code=201,
             responses=errors(400, 404, 409, 413, 415, 422), openapi_extra=EMBEDDING_UPLOAD)
async def register_task(name: HypernetParam, version: VersionParam, task: TaskParam,
                        request: Request, tenant: TenantName, service: Svc) -> HypernetOut:
    """multipart ``embedding``: a safetensors file holding one tensor ``[task_dim]``."""
    form = await read_form(request, service.settings.max_upload_bytes)
    try:
        only_fields(form, ("embedding",))
        embedding = await required_part(form, "embedding", weights=True)
    finally:
        await form.close()
    return HypernetOut.of(await service.hyper.register(tenant, name, version, task,
                                                      embedding))


@router.delete("/{name}/versions/{version}", status_code=204,
                responses=errors(400, 404, 409, 422))
async def delete_hypernetwork_version(name: HypernetParam, version: VersionParam,
                                      tenant: TenantName, service: Svc) -> Response:
    await service.store.delete_hypernet_version(tenant, name, version)
    return Response(status_code=204)
