"""Inference: the native endpoint keyed by task, OpenAI-compatible completions and chat
completions (SSE streaming), and the tenant's models."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from server.auth import TenantName
from server.requests import RequestHandle, TokenEvent
from server.sampling import SamplingParams
from server.schemas import (
    ChatIn,
    CompletionIn,
    GenerateIn,
    GenerateOut,
    ModelCard,
    ModelList,
    Sampling,
)
from server.service import Service, get_service

router = APIRouter(prefix="/v1")
Svc = Annotated[Service, Depends(get_service)]
Chunk = Callable[[TokenEvent | None], dict[str, Any]]


def sampling_of(body: Sampling) -> SamplingParams:
    return SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature,
                          top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                          stop=body.stop_list(), ignore_eos=body.ignore_eos)


async def _collect(events: AsyncIterator[TokenEvent]) -> tuple[list[int], str, TokenEvent]:
    ids: list[int] = []
    text: list[str] = []
    async for event in events:
        if event.token_id is not None:
            ids.append(event.token_id)
        text.append(event.text)
        if event.finish_reason is not None:
            return ids, "".join(text), event
    raise RuntimeError("event stream ended without a finish reason")


async def _run(service: Service, tenant: str, model: str, body: Sampling, *,
               prompt: str | Sequence[int] | None,
               messages: Sequence[Mapping[str, str]] | None
               ) -> tuple[RequestHandle, AsyncGenerator[TokenEvent, None], TokenEvent]:
    """Submit and wait for the first event, so that a failure before the first token
    (adapter load, queue) still answers with its own status instead of a broken stream."""
    handle = await service.submit(tenant, model, prompt=prompt, messages=messages,
                                  sampling=sampling_of(body))
    events = handle.events()
    try:
        first = await events.__anext__()
    except BaseException:
        handle.cancel()
        await events.aclose()
        raise
    return handle, events, first


async def _prepend(first: TokenEvent, rest: AsyncGenerator[TokenEvent, None]
                   ) -> AsyncIterator[TokenEvent]:
    yield first
    if first.finish_reason is None:
        async for event in rest:
            yield event


def _sse(handle: RequestHandle, events: AsyncIterator[TokenEvent],
         chunk: Chunk) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(chunk(event))}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # client gone (or done): the row leaves the batch
            handle.cancel()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _answer(service: Service, tenant: str, model: str, body: Sampling, *,
                  prompt: str | Sequence[int] | None,
                  messages: Sequence[Mapping[str, str]] | None, chunk: Chunk,
                  whole: Callable[[list[int], str, TokenEvent], Any]) -> Any:
    handle, events, first = await _run(service, tenant, model, body, prompt=prompt,
                                       messages=messages)
    stream = _prepend(first, events)
    if body.stream:
        return _sse(handle, stream, chunk)
    try:
        ids, text, last = await _collect(stream)
    finally:
        handle.cancel()
    return whole(ids, text, last)


def _usage(last: TokenEvent) -> dict[str, int]:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens}


@router.post("/tasks/{task}/generate", response_model=None)
async def generate(task: str, body: GenerateIn, tenant: TenantName, service: Svc) -> Any:
    rid = f"gen-{uuid.uuid4().hex}"
    messages = [m.model_dump(include={"role", "content"}) for m in body.messages or []]

    def chunk(event: TokenEvent | None) -> dict[str, Any]:
        assert event is not None
        return {"id": rid, "text": event.text, "token_id": event.token_id,
                "finish_reason": event.finish_reason}

    def whole(ids: list[int], text: str, last: TokenEvent) -> GenerateOut:
        return GenerateOut(id=rid, task=task, text=text, token_ids=ids,
                           finish_reason=str(last.finish_reason),
                           prompt_tokens=last.prompt_tokens,
                           completion_tokens=last.completion_tokens)

    return await _answer(service, tenant, task, body, prompt=body.prompt,
                         messages=messages if body.messages is not None else None,
                         chunk=chunk, whole=whole)


@router.post("/completions", response_model=None)
async def completions(body: CompletionIn, tenant: TenantName, service: Svc) -> Any:
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def base(choice: dict[str, Any]) -> dict[str, Any]:
        return {"id": rid, "object": "text_completion", "created": created,
                "model": body.model, "choices": [choice]}

    def chunk(event: TokenEvent | None) -> dict[str, Any]:
        assert event is not None
        return base({"index": 0, "text": event.text, "logprobs": None,
                     "finish_reason": event.finish_reason})

    def whole(ids: list[int], text: str, last: TokenEvent) -> dict[str, Any]:
        out = base({"index": 0, "text": text, "logprobs": None,
                    "finish_reason": last.finish_reason})
        return {**out, "usage": _usage(last)}

    return await _answer(service, tenant, body.model, body, prompt=body.prompt,
                         messages=None, chunk=chunk, whole=whole)


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatIn, tenant: TenantName, service: Svc) -> Any:
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    messages = [{"role": m.role, "content": m.content} for m in body.messages]

    def chunk(event: TokenEvent | None) -> dict[str, Any]:
        assert event is not None
        return {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": body.model,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": event.text},
                             "finish_reason": event.finish_reason}]}

    def whole(ids: list[int], text: str, last: TokenEvent) -> dict[str, Any]:
        return {"id": rid, "object": "chat.completion", "created": created,
                "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": last.finish_reason}],
                "usage": _usage(last)}

    return await _answer(service, tenant, body.model, body, prompt=None, messages=messages,
                         chunk=chunk, whole=whole)


@router.get("/models")
async def models(tenant: TenantName, service: Svc) -> ModelList:
    tasks = await service.store.store.list_tasks(tenant)
    cards = [ModelCard(id=service.settings.base_alias, owned_by="tessera")]
    cards += [ModelCard(id=b.task, owned_by=tenant) for b in tasks]
    return ModelList(data=cards)
