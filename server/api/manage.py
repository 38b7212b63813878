"""Tenants (admin), adapters and tasks (tenant-scoped)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from tessera.engine.requests import AdapterSpec
from tessera.server.api.openapi import AUTHENTICATED, errors, multipart
from tessera.server.auth import Admin, TenantName
from tessera.server.http_errors import ApiError
from tessera.server.schemas import (
    Activate,
    AdapterList,
    AdapterOut,
    AdapterParam,
    AdapterVersionOut,
    Deactivate,
    TaskList,
    TaskOut,
    TaskParam,
    TenantCreate,
    TenantCreated,
    TenantParam,
    VersionParam,
)
from tessera.server.service import Service, get_service
from tessera.server.uploads import parse_upload, read_form
from tessera.store.names import check_name

router = APIRouter(prefix="/v1", responses=AUTHENTICATED)
Svc = Annotated[Service, Depends(get_service)]
ADAPTER_UPLOAD = multipart(
    {"archive": "a PEFT adapter folder as .tar.gz/.tgz/.tar/.zip"},
    {"config": "adapter_config.json (PEFT) or a tessera manifest (JSON)",
     "weights": "the weights as safetensors (pickle-based files are refused: 415)"},
    description="a new immutable version: an archive, or config + weights")


@router.post("/tenants", status_code=201, responses=errors(400, 409, 413, 422))
async def create_tenant(body: TenantCreate, _: Admin, service: Svc) -> TenantCreated:
    tenant, api_key = await service.store.store.create_tenant(body.name)
    return TenantCreated(name=tenant.name, api_key=api_key)


@router.post("/adapters/{name}", status_code=201, responses=errors(400, 409, 413, 415, 422),
             openapi_extra=ADAPTER_UPLOAD)
async def upload_adapter(name: AdapterParam, request: Request, tenant: TenantName,
                         service: Svc) -> AdapterVersionOut:
    settings = service.settings
    form = await read_form(request, settings.max_upload_bytes)
    try:
        upload = await parse_upload(form, settings.max_archive_bytes)
    finally:
        await form.close()
    return AdapterVersionOut.of(await service.upload(tenant, name, upload))


@router.get("/adapters")
async def list_adapters(tenant: TenantName, service: Svc) -> AdapterList:
    return AdapterList(adapters=await service.store.store.list_adapters(tenant))


@router.get("/adapters/{name}", responses=errors(400, 404, 422))
async def get_adapter(name: AdapterParam, tenant: TenantName, service: Svc) -> AdapterOut:
    versions = await service.versions(tenant, name)
    return AdapterOut(name=name, versions=[AdapterVersionOut.of(v) for v in versions])


@router.delete("/adapters/{name}/versions/{version}", status_code=204,
                responses=errors(400, 404, 409, 422))
async def delete_version(name: AdapterParam, version: VersionParam, tenant: TenantName,
                         service: Svc) -> Response:
    await service.store.delete_version(tenant, name, version)
    return Response(status_code=204)


@router.post("/tasks/{task}/activate", responses=errors(400, 404, 409, 413, 422))
async def activate(task: TaskParam, body: Activate, tenant: TenantName,
                   service: Svc) -> TaskOut:
    return TaskOut.of(await service.activate(tenant, task, body))


@router.post("/tasks/{task}/deactivate", responses=errors(400, 404, 409, 413, 422))
async def deactivate(task: TaskParam, tenant: TenantName, service: Svc,
                     body: Deactivate | None = None) -> TaskOut:
    await service.task(tenant, task)  # 404 for an unknown (or another tenant's) task
    revision = await service.store.deactivate(
        tenant, task, actor=tenant,
        expected_revision=body.expected_revision if body else None)
    return TaskOut(task=task, adapter=None, version=None, revision=revision)


@router.get("/tasks")
async def list_tasks(tenant: TenantName, service: Svc) -> TaskList:
    return TaskList(tasks=[TaskOut.of(b) for b in await service.store.store.list_tasks(tenant)])


@router.get("/tasks/{task}", responses=errors(400, 404, 422))
async def get_task(task: TaskParam, tenant: TenantName, service: Svc) -> TaskOut:
    return TaskOut.of(await service.task(tenant, task))


# --- hot tenants (admin) ------------------------------------------------------------------
async def _mergeable_spec(service: Service, tenant: str, task: str) -> AdapterSpec:
    spec = await service.adapter_for(check_name(tenant, "tenant"), task)
    if spec is None:
        raise ApiError(400, "invalid_request", "the base model has no adapter to merge",
                       field="task")
    return spec


@router.post("/admin/tenants/{tenant}/tasks/{task}/pin", responses=errors(400, 404, 422))
async def pin_task(tenant: TenantParam, task: TaskParam, _: Admin,
                   service: Svc) -> dict[str, object]:
    """Serve the task's bound adapter from merged weights regardless of traffic; returns
    once the merged copy serves new rows (422 for adapters with no merged form)."""
    spec = await _mergeable_spec(service, tenant, task)
    await service.engine.pin(spec)
    return {"tenant": tenant, "task": task, "adapter": spec.key,
            "merged": service.engine.is_merged(spec.key)}


@router.post("/admin/tenants/{tenant}/tasks/{task}/unpin", responses=errors(400, 404, 422))
async def unpin_task(tenant: TenantParam, task: TaskParam, _: Admin,
                     service: Svc) -> dict[str, object]:
    """Release a pin; the traffic policy decides whether the merged copy stays."""
    spec = await _mergeable_spec(service, tenant, task)
    return {"tenant": tenant, "task": task, "adapter": spec.key,
            "was_pinned": service.engine.unpin(spec.key)}
