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

from tessera.engine.errors import QueueFullError
from tessera.engine.requests import AdapterSpec, RequestHandle, TokenEvent
from tessera.engine.sampling import SamplingParams
from tessera.server.api.openapi import AUTHENTICATED, errors, event_stream
from tessera.server.auth import TenantName
from tessera.server.http_errors import client_gone, describe
from tessera.server.logs import bind_request
from tessera.server.metrics import Metrics
from tessera.server.openai_schemas import (
    ChatChunk,
    ChatCompletionOut,
    ChatIn,
    CompletionChunk,
    CompletionIn,
    CompletionOut,
    ModelCard,
    ModelList,
    OpenAISampling,
)
from tessera.server.schemas import GenerateChunk, GenerateIn, GenerateOut, Sampling, TaskParam
from tessera.server.service import Service, get_service

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", responses=AUTHENTICATED)
Svc = Annotated[Service, Depends(get_service)]
# bad input, unknown task, over the context, queue full (Retry-After)
INFERENCE_ERRORS = errors(400, 404, 413, 422, 429)
Chunk = Callable[[TokenEvent | None], dict[str, Any]]


def sampling_of(body: Sampling, logprobs: int | None = None) -> SamplingParams:
    """The engine's parameters; ``logprobs``: alternatives reported per token."""
    limit = body.token_limit() if isinstance(body, OpenAISampling) else body.max_tokens
    return SamplingParams(max_tokens=limit, temperature=body.temperature,
                          top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                          stop=body.stop_list(), ignore_eos=body.ignore_eos,
                          logprobs=logprobs or 0)


class _Observed:
    """One request's timings for the metrics (submit, first token, end) and its
    "request finished" log line; binds the request's fields to the log context
    (:func:`tessera.server.logs.bind_request`: every line logged while serving it carries them)."""

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


async def _run(service: Service, tenant: str, model: str, params: SamplingParams, *,
               prompt: str | Sequence[int] | None,
               messages: Sequence[Mapping[str, str]] | None, observed: _Observed
               ) -> tuple[RequestHandle, AsyncGenerator[TokenEvent, None], TokenEvent]:
    """Submit and wait for the first event, so that a failure before the first token
    (adapter load, queue) still answers with its own status instead of a broken stream."""
    try:
        spec, method = await service.resolve(tenant, model)
        observed.resolved(spec, method)
        handle = await service.submit(spec, request_id=observed.request_id, prompt=prompt,
                                      messages=messages, sampling=params)
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


def _sse(handle: RequestHandle, events: AsyncIterator[TokenEvent], chunk: Chunk,
         tail: Callable[[TokenEvent], dict[str, Any]] | None = None) -> StreamingResponse:
    """Server-sent events: one chunk per event, ``tail(last event)`` (the usage chunk)
    when given, then ``[DONE]``; an error after the first bytes is an error event."""
    async def body() -> AsyncIterator[str]:
        try:
            try:
                last: TokenEvent | None = None
                async for event in events:
                    last = event
                    yield f"data: {json.dumps(chunk(event))}\n\n"
                if tail is not None and last is not None:
                    yield f"data: {json.dumps(tail(last))}\n\n"
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


async def _gather(stream: AsyncIterator[TokenEvent]) -> list[TokenEvent]:
    """Every event up to and including the final one."""
    events: list[TokenEvent] = []
    async for event in stream:
        events.append(event)
        if event.finish_reason is not None:
            return events
    raise RuntimeError("event stream ended without a finish reason")


async def _collect_unless_gone(request: Request, handle: RequestHandle,
                               stream: AsyncIterator[TokenEvent]) -> list[TokenEvent]:
    """The whole result; a client that leaves first cancels the row at once (a
    non-streaming request must not keep generating for nobody)."""
    work = asyncio.ensure_future(_gather(stream))
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
                  whole: Callable[[list[TokenEvent]], Any], logprobs: int | None = None,
                  tail: Callable[[TokenEvent], dict[str, Any]] | None = None) -> Any:
    """Run one request; ``whole(events)`` answers a non-streaming one, ``chunk(event)``
    (and ``tail``) a streaming one."""
    observed = _Observed(service.metrics, tenant, rid, model)
    handle, events, first = await _run(service, tenant, model, sampling_of(body, logprobs),
                                       prompt=prompt, messages=messages, observed=observed)
    stream = _prepend(first, events, observed)
    if body.stream:
        return _sse(handle, stream, chunk, tail)
    try:
        gathered = await _collect_unless_gone(request, handle, stream)
    finally:
        handle.cancel()
    # _gather stops at the final event: end the stream now (its "request finished"
    # accounting and log line), not whenever the generator is garbage-collected
    await stream.aclose()
    return whole(gathered)


def _tokens(events: Sequence[TokenEvent]) -> list[TokenEvent]:
    return [e for e in events if e.token_id is not None]


def _text(events: Sequence[TokenEvent]) -> str:
    return "".join(e.text for e in events)


def _completion_logprobs(service: Service, events: Sequence[TokenEvent]
                         ) -> dict[str, Any]:
    """OpenAI's legacy completions ``logprobs`` for ``events``."""
    tokens = _tokens(events)
    texts = service.token_texts([e.token_id for e in tokens if e.token_id is not None])
    offsets, at = [], 0
    for text in texts:
        offsets.append(at)
        at += len(text)
    top: list[dict[str, float]] = []
    for e in tokens:
        alternatives: dict[str, float] = {}
        texts_of = service.token_texts([t for t, _ in e.top_logprobs])
        for text, (_, logprob) in zip(texts_of, e.top_logprobs, strict=True):
            alternatives.setdefault(text, logprob)  # two ids, one text: keep the likelier
        top.append(alternatives)
    return {"tokens": texts, "token_logprobs": [e.logprob for e in tokens],
            "top_logprobs": top, "text_offset": offsets}


def _chat_logprobs(service: Service, events: Sequence[TokenEvent]) -> dict[str, Any]:
    """Chat completions' ``logprobs.content`` for ``events``."""
    def entry(token: str, logprob: float | None) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    content = []
    for e in _tokens(events):
        assert e.token_id is not None
        alternatives = service.token_texts([t for t, _ in e.top_logprobs])
        content.append({**entry(service.token_texts([e.token_id])[0], e.logprob),
                        "top_logprobs": [entry(t, v) for t, (_, v) in
                                         zip(alternatives, e.top_logprobs, strict=True)]})
    return {"content": content}


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

    def whole(events: list[TokenEvent]) -> GenerateOut:
        last = events[-1]
        return GenerateOut(id=rid, task=task, text=_text(events),
                           token_ids=[e.token_id for e in _tokens(events)
                                      if e.token_id is not None],
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

    wanted = body.top_logprobs()
    usage = body.stream_options is not None and body.stream_options.include_usage

    def base(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": rid, "object": "text_completion", "created": created,
                "model": body.model, "choices": choices}

    def choice(events: list[TokenEvent], finish: str | None) -> dict[str, Any]:
        logprobs = None if wanted is None else _completion_logprobs(service, events)
        return {"index": 0, "text": _text(events), "logprobs": logprobs,
                "finish_reason": finish}

    def chunk(event: TokenEvent | None) -> dict[str, Any]:
        assert event is not None
        out = base([choice([event], event.finish_reason)])
        return {**out, "usage": None} if usage else out

    def whole(events: list[TokenEvent]) -> dict[str, Any]:
        return {**base([choice(events, events[-1].finish_reason)]),
                "usage": _usage(events[-1])}

    return await _answer(request, service, tenant, body.model, body, rid=rid,
                         prompt=body.prompt, messages=None, chunk=chunk, whole=whole,
                         logprobs=wanted,
                         tail=(lambda last: {**base([]), "usage": _usage(last)})
                         if usage else None)


@router.post("/chat/completions", response_model=None, responses={
    **event_stream(ChatCompletionOut, ChatChunk, "the chat completion"), **INFERENCE_ERRORS})
async def chat_completions(body: ChatIn, tenant: TenantName, service: Svc,
                           request: Request) -> Any:
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    messages = [{"role": m.role, "content": m.content} for m in body.messages]

    wanted = body.top_logprob_count()
    usage = body.stream_options is not None and body.stream_options.include_usage

    def head(kind: str) -> dict[str, Any]:
        return {"id": rid, "object": kind, "created": created, "model": body.model}

    def logprobs(events: list[TokenEvent]) -> dict[str, Any] | None:
        return None if wanted is None else _chat_logprobs(service, events)

    def chunk(event: TokenEvent | None) -> dict[str, Any]:
        assert event is not None
        out = {**head("chat.completion.chunk"), "choices": [{
            "index": 0, "delta": {"role": "assistant", "content": event.text},
            "logprobs": logprobs([event]), "finish_reason": event.finish_reason}]}
        return {**out, "usage": None} if usage else out

    def whole(events: list[TokenEvent]) -> dict[str, Any]:
        return {**head("chat.completion"), "choices": [{
            "index": 0, "message": {"role": "assistant", "content": _text(events)},
            "logprobs": logprobs(events), "finish_reason": events[-1].finish_reason}],
            "usage": _usage(events[-1])}

    return await _answer(request, service, tenant, body.model, body, rid=rid, prompt=None,
                         messages=messages, chunk=chunk, whole=whole, logprobs=wanted,
                         tail=(lambda last: {**head("chat.completion.chunk"), "choices": [],
                                             "usage": _usage(last)}) if usage else None)


def _card(service: Service, model: str, owner: str) -> ModelCard:
    base = service.settings.base_alias
    return ModelCard(id=model, owned_by=owner, root=service.base_name,
                     parent=None if model == base else base,
                     max_model_len=service.engine.base.context_limit)


@router.get("/models")
async def models(tenant: TenantName, service: Svc) -> ModelList:
    tasks = await service.store.store.list_tasks(tenant)
    cards = [_card(service, service.settings.base_alias, "tessera")]
    cards += [_card(service, b.task, tenant) for b in tasks]
    return ModelList(data=cards)


@router.get("/models/{model}", responses=errors(400, 404, 422))
async def model_card(model: TaskParam, tenant: TenantName, service: Svc) -> ModelCard:
    """One model: the base alias, or a task of the caller's (404 otherwise)."""
    if service.is_base(model):
        return _card(service, service.settings.base_alias, "tessera")
    await service.task(tenant, model)  # 404 unless it is the tenant's task
    return _card(service, model, tenant)
