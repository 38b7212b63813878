"""Tenants (admin), adapters and tasks (tenant-scoped), and vLLM's runtime LoRA endpoints
(:mod:`tessera.server.vllm_lora`)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import PlainTextResponse

from tessera.engine.requests import AdapterSpec
from tessera.server import vllm_lora
from tessera.server.api.openapi import AUTHENTICATED, ErrorBody, Responses, errors, multipart
from tessera.server.auth import Admin, TenantName
from tessera.server.http_errors import OPENAI_TAG, ApiError
from tessera.server.openai_schemas import LoadLoraIn, UnloadLoraIn
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
    tenant, api_key = await service.store.create_tenant(body.name)
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
    return AdapterList(adapters=await service.store.list_adapters(tenant))


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
    return TaskList(tasks=[TaskOut.of(b) for b in await service.store.list_tasks(tenant)])


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


# --- vLLM's runtime LoRA loading ----------------------------------------------------------
OPENAI: list[str | Enum] = [OPENAI_TAG]  # validation errors answer 400, as vLLM's


def _lora_responses(done: str, *codes: int) -> Responses:
    """200 as vLLM answers it (text), the errors as JSON: spelled out, since FastAPI would
    document them in the route's text/plain media type."""
    listed = {**AUTHENTICATED, **errors(*codes), 403: {**AUTHENTICATED[403], "description": (
        "The server has no adapter root (TESSERA_LORA_ADAPTER_ROOT): loading from its "
        "filesystem is disabled; or the key is not a tenant's")}}
    error: dict[str, Any] = {"application/json": {"schema": {
        "$ref": f"#/components/schemas/{ErrorBody.__name__}"}}}
    out: Responses = {code: {**{k: v for k, v in entry.items() if k != "model"},
                             "content": error} for code, entry in listed.items()}
    out[200] = {"description": done, "content": {"text/plain": {"schema": {"type": "string"}}}}
    return out


@router.post("/load_lora_adapter", tags=OPENAI, response_class=PlainTextResponse,
             responses=_lora_responses("loaded: the task lora_name serves the new version",
                                       400, 404, 409, 413, 415, 422))
async def load_lora_adapter(body: LoadLoraIn, tenant: TenantName,
                            service: Svc) -> PlainTextResponse:
    """vLLM's: the PEFT folder ``lora_path`` (under the server's adapter root) becomes a
    new version of the caller's adapter ``lora_name``, and the task ``lora_name`` is bound
    to it."""
    await vllm_lora.load(service, tenant, body.lora_name, body.lora_path,
                         in_place=body.load_inplace)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/unload_lora_adapter", tags=OPENAI, response_class=PlainTextResponse,
             responses=_lora_responses("unloaded: the task lora_name is unbound",
                                       400, 404, 409, 422))
async def unload_lora_adapter(body: UnloadLoraIn, tenant: TenantName,
                              service: Svc) -> PlainTextResponse:
    """vLLM's: the task ``lora_name`` is unbound (its adapter's versions stay stored)."""
    await vllm_lora.unload(service, tenant, body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed "
                             "successfully.")
