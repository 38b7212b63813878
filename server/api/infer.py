"""Inference: the native endpoint keyed by task, OpenAI-compatible completions and chat
completions (SSE streaming), and the tenant's models."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from engine.errors import QueueFullError
from engine.requests import AdapterSpec, RequestHandle, TokenEvent, collect
from engine.sampling import SamplingParams
from server.api.openapi import AUTHENTICATED, errors, event_stream
from server.auth import TenantName
from server.http_errors import client_gone, describe
from server.logs import bind_request
from server.metrics import Metrics
from server.schemas import (
    ChatChunk,
    ChatCompletionOut,
    ChatIn,
    CompletionChunk,
    CompletionIn,
    CompletionOut,
    GenerateChunk,
    GenerateIn,
    GenerateOut,
    ModelCard,
    ModelList,
    Sampling,
    TaskParam,
)
from server.service import Service, get_service

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", responses=AUTHENTICATED)
Svc = Annotated[Service, Depends(get_service)]
# bad input, unknown task, over the context, queue full (Retry-After)
INFERENCE_ERRORS = errors(400, 404, 413, 422, 429)
Chunk = Callable[[TokenEvent | None], dict[str, Any]]


def sampling_of(body: Sampling) -> SamplingParams:
    return SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature,
                          top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                          stop=body.stop_list(), ignore_eos=body.ignore_eos)


class _Observed:
    """One request's timings for the metrics (submit, first token, end) and its
    "request finished" log line; binds the request's fields to the log context
    (:func:`server.logs.bind_request`: every line logged while serving it carries them)."""

    def __init__(self, metrics: Metrics, tenant: str, request_id: str, model: str) -> None:
        self.metrics, self.tenant = metrics, tenant
        self.request_id, self.model = request_id, model
        self.adapter: str | None = None
        self.method: str | None = None
        self.start = time.monotonic()
        self.first_s: float | None = None
        bind_request(request_id=request_id, tenant=tenant, model=model)

    def resolved(self, spec: AdapterSpec | None, method: str | None) -> None:
        self.adapter, self.method = (spec.key if spec is not None else None), method
        bind_request(adapter=self.adapter, method=method)

    def first_token(self) -> None:
        self.first_s = time.monotonic() - self.start
        self.metrics.observe_first_token(tenant=self.tenant, method=self.method,
                                         seconds=self.first_s)

    def end(self, last: TokenEvent | None, outcome: str) -> None:
        latency_s = time.monotonic() - self.start
        prompt_tokens = last.prompt_tokens if last else 0
        completion_tokens = last.completion_tokens if last else 0
        self.metrics.observe_request(
            tenant=self.tenant, method=self.method, latency_s=latency_s,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            first_token_s=self.first_s, outcome=outcome)
        # the fields explicitly: a stream may end outside the request's log context
        log.info("request finished", extra={
            "request_id": self.request_id, "tenant": self.tenant, "model": self.model,
            "adapter": self.adapter, "method": self.method,
            "outcome": outcome,
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "latency_s": round(latency_s, 4),
            "first_token_s": None if self.first_s is None else round(self.first_s, 4)})


async def _run(service: Service, tenant: str, model: str, body: Sampling, *,
               prompt: str | Sequence[int] | None,
               messages: Sequence[Mapping[str, str]] | None, observed: _Observed
               ) -> tuple[RequestHandle, AsyncGenerator[TokenEvent, None], TokenEvent]:
    """Submit and wait for the first event, so that a failure before the first token
    (adapter load, queue) still answers with its own status instead of a broken stream."""
    try:
        spec, method = await service.resolve(tenant, model)
        observed.resolved(spec, method)
        handle = await service.submit(spec, request_id=observed.request_id, prompt=prompt,
                                      messages=messages, sampling=sampling_of(body))
    except QueueFullError:
        observed.end(None, "rejected")
        raise
    except BaseException:
        observed.end(None, "error")
        raise
    events = handle.events()
    try:
        first = await events.__anext__()
    except BaseException:
        handle.cancel()
        await events.aclose()
        observed.end(None, "error")
        raise
    observed.first_token()
    return handle, events, first


async def _prepend(first: TokenEvent, rest: AsyncGenerator[TokenEvent, None],
                   observed: _Observed) -> AsyncGenerator[TokenEvent, None]:
    last: TokenEvent | None = first
    outcome: str | None = None
    try:
        yield first
        if first.finish_reason is None:
            async for event in rest:
                last = event
                yield event
    except Exception:
        outcome = "error"
        raise
    finally:  # finished, failed or abandoned by the client: counted once
        reason = last.finish_reason if last is not None else None
        observed.end(last, outcome or reason or "cancelled")


def _sse(handle: RequestHandle, events: AsyncIterator[TokenEvent],
         chunk: Chunk) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            try:
                async for event in events:
                    yield f"data: {json.dumps(chunk(event))}\n\n"
            except Exception as exc:  # failed after the first bytes: say so, never cut
                _, error, _ = describe(exc)
                yield f"data: {json.dumps(error)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # client gone (or done): the row leaves the batch
            handle.cancel()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body was read: the next ASGI message is
    ``http.disconnect``)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect_unless_gone(request: Request, handle: RequestHandle,
                               stream: AsyncIterator[TokenEvent]
                               ) -> tuple[list[int], str, TokenEvent]:
    """The whole result; a client that leaves first cancels the row at once (a
    non-streaming request must not keep generating for nobody)."""
    work = asyncio.ensure_future(collect(stream))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            handle.cancel()  # the row leaves the batch before the next step
            work.cancel()
    if not work.done() or work.cancelled():
        raise client_gone()
    return work.result()


async def _answer(request: Request, service: Service, tenant: str, model: str,
                  body: Sampling, *, rid: str, prompt: str | Sequence[int] | None,
                  messages: Sequence[Mapping[str, str]] | None, chunk: Chunk,
                  whole: Callable[[list[int], str, TokenEvent], Any]) -> Any:
    observed = _Observed(service.metrics, tenant, rid, model)
    handle, events, first = await _run(service, tenant, model, body, prompt=prompt,
                                       messages=messages, observed=observed)
    stream = _prepend(first, events, observed)
    if body.stream:
        return _sse(handle, stream, chunk)
    try:
        ids, text, last = await _collect_unless_gone(request, handle, stream)
    finally:
        handle.cancel()
    # collect() stops at the final event: end the stream now (its "request finished"
    # accounting and log line), not whenever the generator is garbage-collected
    await stream.aclose()
    return whole(ids, text, last)


def _usage(last: TokenEvent) -> dict[str, int]:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens}


@router.post("/tasks/{task}/generate", response_model=None, responses={
    **event_stream(GenerateOut, GenerateChunk, "the generated text"), **INFERENCE_ERRORS})
async def generate(task: TaskParam, body: GenerateIn, tenant: TenantName, service: Svc,
                   request: Request) -> Any:
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

    return await _answer(request, service, tenant, task, body, rid=rid, prompt=body.prompt,
                         messages=messages if body.messages is not None else None,
                         chunk=chunk, whole=whole)


@router.post("/completions", response_model=None, responses={
    **event_stream(CompletionOut, CompletionChunk, "the completion"), **INFERENCE_ERRORS})
async def completions(body: CompletionIn, tenant: TenantName, service: Svc,
                      request: Request) -> Any:
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

    return await _answer(request, service, tenant, body.model, body, rid=rid,
                         prompt=body.prompt, messages=None, chunk=chunk, whole=whole)


@router.post("/chat/completions", response_model=None, responses={
    **event_stream(ChatCompletionOut, ChatChunk, "the chat completion"), **INFERENCE_ERRORS})
async def chat_completions(body: ChatIn, tenant: TenantName, service: Svc,
                           request: Request) -> Any:
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

    return await _answer(request, service, tenant, body.model, body, rid=rid, prompt=None,
                         messages=messages, chunk=chunk, whole=whole)


@router.get("/models")
async def models(tenant: TenantName, service: Svc) -> ModelList:
    tasks = await service.store.store.list_tasks(tenant)
    cards = [ModelCard(id=service.settings.base_alias, owned_by="tessera")]
    cards += [ModelCard(id=b.task, owned_by=tenant) for b in tasks]
    return ModelList(data=cards)
