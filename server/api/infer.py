"""Inference: the native endpoint keyed by task, OpenAI-compatible completions and chat
completions (SSE streaming; ``n`` choices and prompt batches, each choice its own engine
request, run by :mod:`tessera.server.api.choices`), and the tenant's models."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from tessera.engine.requests import TokenEvent
from tessera.engine.sampling import SamplingParams
from tessera.server.api.choices import Job, Messages, answer
from tessera.server.api.openapi import AUTHENTICATED, errors, event_stream
from tessera.server.auth import TenantName
from tessera.server.http_errors import OPENAI_TAG, ApiError
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
OPENAI: list[str | Enum] = [OPENAI_TAG]  # validation errors answer 400 on these routes


def sampling_of(body: Sampling, service: Service, logprobs: int | None = None
                ) -> SamplingParams:
    """The engine's parameters (``logprobs``: alternatives reported per token), after the
    checks that need the server: ``min_tokens`` within the token limit, ``logit_bias``
    token ids within the vocabulary (400 naming the field)."""
    limit = body.token_limit() if isinstance(body, OpenAISampling) else body.max_tokens
    if limit is not None and body.min_tokens > limit:
        raise ApiError(400, "invalid_request", f"min_tokens ({body.min_tokens}) exceeds the "
                       f"token limit ({limit})", field="min_tokens")
    bias = body.bias_pairs()
    vocab = int(service.engine.base.model.config.vocab_size)
    outside = [token for token, _ in bias if token >= vocab]
    if outside:
        raise ApiError(400, "invalid_request", f"logit_bias names token id {outside[0]}, "
                       f"outside the vocabulary [0, {vocab})", field="logit_bias")
    return SamplingParams(max_tokens=limit, temperature=body.temperature,
                          top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                          stop=body.stop_list(), ignore_eos=body.ignore_eos,
                          logprobs=logprobs or 0, presence_penalty=body.presence_penalty,
                          frequency_penalty=body.frequency_penalty,
                          repetition_penalty=body.repetition_penalty, logit_bias=bias,
                          min_tokens=body.min_tokens)


def _check_choices(service: Service, n: int, prompts: int = 1) -> None:
    """n x prompts engine requests, bounded by the ``max_choices`` setting before any."""
    limit = service.settings.max_choices
    if n * prompts > limit:
        what = f"n={n} x {prompts} prompts = {n * prompts}" if prompts > 1 else f"n={n}"
        raise ApiError(400, "invalid_request", f"{what} choices; at most {limit} per "
                       "request (the server's max_choices)", field="n")


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


def _usage(lasts: Sequence[TokenEvent], n: int = 1) -> dict[str, int]:
    """Usage of every choice (the last event of each, ``n`` per prompt in order): each
    prompt counted once, every choice's completion tokens."""
    prompt = sum(last.prompt_tokens for last in lasts[::n])
    completion = sum(last.completion_tokens for last in lasts)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _jobs(params: SamplingParams, n: int, prompts: Sequence[str | Sequence[int] | None],
          messages: Messages | None = None) -> list[Job]:
    """One job per choice: prompt by prompt, ``n`` each (choice index ``i * n + j``, as
    OpenAI orders them); with a seed, choice ``j`` of a prompt samples with ``seed + j``
    (vLLM's rule), so that the n choices differ yet repeat."""
    jobs = []
    for prompt in prompts:
        for j in range(n):
            own = params if params.seed is None or j == 0 else params.model_copy(
                update={"seed": (params.seed + j) % 2**63})
            jobs.append(Job(prompt, messages, own))
    return jobs


@router.post("/tasks/{task}/generate", response_model=None, responses={
    **event_stream(GenerateOut, GenerateChunk, "the generated text"), **INFERENCE_ERRORS})
async def generate(task: TaskParam, body: GenerateIn, tenant: TenantName, service: Svc,
                   request: Request) -> Any:
    rid = f"gen-{uuid.uuid4().hex}"
    messages = ([{"role": m.role, "content": m.text()} for m in body.messages]
                if body.messages is not None else None)

    def chunk(_: int, event: TokenEvent) -> dict[str, Any]:
        return {"id": rid, "text": event.text, "token_id": event.token_id,
                "finish_reason": event.finish_reason}

    def whole(choices: list[list[TokenEvent]]) -> GenerateOut:
        [events] = choices
        last = events[-1]
        return GenerateOut(id=rid, task=task, text=_text(events),
                           token_ids=[e.token_id for e in _tokens(events)
                                      if e.token_id is not None],
                           finish_reason=str(last.finish_reason),
                           prompt_tokens=last.prompt_tokens,
                           completion_tokens=last.completion_tokens)

    jobs = _jobs(sampling_of(body, service), 1, [body.prompt], messages)
    return await answer(request, service, tenant, task, body.stream, rid=rid, jobs=jobs,
                         chunk=chunk, whole=whole)


@router.post("/completions", response_model=None, tags=OPENAI, responses={
    **event_stream(CompletionOut, CompletionChunk, "the completion"), **INFERENCE_ERRORS})
async def completions(body: CompletionIn, tenant: TenantName, service: Svc,
                      request: Request) -> Any:
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    prompts = body.prompts()
    _check_choices(service, body.n, len(prompts))
    wanted = body.top_logprobs()
    params = sampling_of(body, service, wanted)
    usage = body.stream_options is not None and body.stream_options.include_usage
    # echo: each choice's text starts with its prompt's (token ids: decoded)
    echoes = [(p if isinstance(p, str) else service.engine.base.tokenizer.decode(p))
              if body.echo else "" for p in prompts]
    echoed: set[int] = set()  # streamed choices whose prompt was sent

    def base(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": rid, "object": "text_completion", "created": created,
                "model": body.model, "choices": choices}

    def choice(index: int, text: str, events: list[TokenEvent],
               finish: str | None) -> dict[str, Any]:
        logprobs = None if wanted is None else _completion_logprobs(service, events)
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def chunk(index: int, event: TokenEvent) -> dict[str, Any]:
        prefix = "" if index in echoed else echoes[index // body.n]
        echoed.add(index)
        out = base([choice(index, prefix + event.text, [event], event.finish_reason)])
        return {**out, "usage": None} if usage else out

    def whole(choices: list[list[TokenEvent]]) -> dict[str, Any]:
        return {**base([choice(i, echoes[i // body.n] + _text(events), events,
                               events[-1].finish_reason)
                        for i, events in enumerate(choices)]),
                "usage": _usage([events[-1] for events in choices], body.n)}

    return await answer(request, service, tenant, body.model, body.stream, rid=rid,
                         jobs=_jobs(params, body.n, prompts), chunk=chunk, whole=whole,
                         tail=(lambda lasts: {**base([]), "usage": _usage(lasts, body.n)})
                         if usage else None)


@router.post("/chat/completions", response_model=None, tags=OPENAI, responses={
    **event_stream(ChatCompletionOut, ChatChunk, "the chat completion"), **INFERENCE_ERRORS})
async def chat_completions(body: ChatIn, tenant: TenantName, service: Svc,
                           request: Request) -> Any:
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    _check_choices(service, body.n)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    wanted = body.top_logprob_count()
    params = sampling_of(body, service, wanted)
    usage = body.stream_options is not None and body.stream_options.include_usage

    def head(kind: str) -> dict[str, Any]:
        return {"id": rid, "object": kind, "created": created, "model": body.model}

    def logprobs(events: list[TokenEvent]) -> dict[str, Any] | None:
        return None if wanted is None else _chat_logprobs(service, events)

    def chunk(index: int, event: TokenEvent) -> dict[str, Any]:
        out = {**head("chat.completion.chunk"), "choices": [{
            "index": index, "delta": {"role": "assistant", "content": event.text},
            "logprobs": logprobs([event]), "finish_reason": event.finish_reason}]}
        return {**out, "usage": None} if usage else out

    def whole(choices: list[list[TokenEvent]]) -> dict[str, Any]:
        return {**head("chat.completion"), "choices": [{
            "index": i, "message": {"role": "assistant", "content": _text(events)},
            "logprobs": logprobs(events), "finish_reason": events[-1].finish_reason}
            for i, events in enumerate(choices)],
            "usage": _usage([events[-1] for events in choices], body.n)}

    return await answer(request, service, tenant, body.model, body.stream, rid=rid,
                         jobs=_jobs(params, body.n, [None], messages), chunk=chunk,
                         whole=whole,
                         tail=(lambda lasts: {**head("chat.completion.chunk"), "choices": [],
                                              "usage": _usage(lasts, body.n)})
                         if usage else None)


def _card(service: Service, model: str, owner: str) -> ModelCard:
    base = service.settings.base_alias
    return ModelCard(id=model, owned_by=owner, root=service.base_name,
                     parent=None if model == base else base,
                     max_model_len=service.engine.base.context_limit)


@router.get("/models", tags=OPENAI)
async def models(tenant: TenantName, service: Svc) -> ModelList:
    tasks = await service.store.list_tasks(tenant)
    cards = [_card(service, service.settings.base_alias, "tessera")]
    cards += [_card(service, b.task, tenant) for b in tasks]
    return ModelList(data=cards)


@router.get("/models/{model}", tags=OPENAI, responses=errors(400, 404, 422))
async def model_card(model: TaskParam, tenant: TenantName, service: Svc) -> ModelCard:
    """One model: the base alias, or a task of the caller's (404 otherwise)."""
    if service.is_base(model):
        return _card(service, service.settings.base_alias, "tessera")
    await service.task(tenant, model)  # 404 unless it is the tenant's task
    return _card(service, model, tenant)
