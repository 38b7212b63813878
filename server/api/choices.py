"""Running one inference request's choices (one engine request each): resolve the model
once, submit every choice, wait for every first event (a failure before the first token
answers with its own status), then stream the events of all choices as server-sent events
or collect them whole; a client that leaves cancels every row at once. Each engine request
has its metrics and its "request finished" log line."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from tessera.engine.errors import QueueFullError
from tessera.engine.requests import AdapterSpec, RequestHandle, TokenEvent
from tessera.engine.sampling import SamplingParams
from tessera.server.http_errors import client_gone, describe
from tessera.server.logs import bind_request
from tessera.server.metrics import Metrics
from tessera.server.service import Service

# the "request finished" lines keep their documented logger (docs/serving.md)
log = logging.getLogger("tessera.server.api.infer")
Chunk = Callable[[int, TokenEvent], dict[str, Any]]  # (choice index, event) -> SSE data
Tail = Callable[[list[TokenEvent]], dict[str, Any]]  # last event of each choice -> data
Messages = Sequence[Mapping[str, str]]


class Observed:
    """One engine request's timings for the metrics (submit, first token, end) and its
    "request finished" log line (the response's fields are bound to the log context once,
    by :func:`_bind`)."""

    def __init__(self, metrics: Metrics, tenant: str, request_id: str, model: str) -> None:
        self.metrics, self.tenant = metrics, tenant
        self.request_id, self.model = request_id, model
        self.adapter: str | None = None
        self.method: str | None = None
        self.start = time.monotonic()
        self.first_s: float | None = None

    def resolved(self, spec: AdapterSpec | None, method: str | None) -> None:
        self.adapter, self.method = (spec.key if spec is not None else None), method

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


@dataclass(frozen=True)
class Job:
    """One choice to generate: its prompt (or messages) and sampling."""

    prompt: str | Sequence[int] | None
    messages: Messages | None
    params: SamplingParams


@dataclass(frozen=True)
class _Running:
    """A submitted choice whose first event arrived: ``events`` replays it first."""

    handle: RequestHandle
    events: AsyncGenerator[TokenEvent, None]


async def _start(service: Service, tenant: str, model: str, rid: str, jobs: Sequence[Job]
                 ) -> list[_Running]:
    """Resolve ``model`` once, submit every job (engine ids ``rid``, or ``rid-i`` for
    several), and wait for every first event, so that a failure before the first token
    (adapter load, queue full, a bad request) answers with its own status instead of a
    broken stream. On any failure every submitted choice is cancelled (and counted so);
    the failing one is counted as ``error`` (``rejected``: queue full)."""
    observed = [Observed(service.metrics, tenant, rid if len(jobs) == 1 else f"{rid}-{i}",
                         model) for i in range(len(jobs))]
    handles: list[RequestHandle] = []
    try:
        spec, method = await service.resolve(tenant, model)
        bind_request(adapter=spec.key if spec is not None else None, method=method)
        for obs, job in zip(observed, jobs, strict=True):
            obs.resolved(spec, method)
            handles.append(await service.submit(
                spec, request_id=obs.request_id, prompt=job.prompt, messages=job.messages,
                sampling=job.params))
    except BaseException as exc:
        for handle, obs in zip(handles, observed, strict=False):
            handle.cancel()
            obs.end(None, "cancelled")
        # the job that failed (the first one when resolving failed); later ones never ran
        observed[len(handles)].end(None, "rejected" if isinstance(exc, QueueFullError)
                                   else "error")
        raise
    streams = [h.events() for h in handles]
    try:
        firsts = await asyncio.gather(*(s.__anext__() for s in streams),
                                      return_exceptions=True)
    except BaseException:  # cancelled while waiting: the rows must not run on
        for handle in handles:
            handle.cancel()
        raise
    failure = next((f for f in firsts if isinstance(f, BaseException)), None)
    if failure is not None:
        for handle, stream, obs, first in zip(handles, streams, observed, firsts, strict=True):
            handle.cancel()
            await stream.aclose()
            if isinstance(first, TokenEvent):
                obs.end(first, "cancelled")
            else:
                obs.end(None, "error")
        raise failure
    running = []
    for handle, stream, obs, first in zip(handles, streams, observed, firsts, strict=True):
        assert isinstance(first, TokenEvent)
        obs.first_token()
        running.append(_Running(handle, _prepend(first, stream, obs)))
    return running


async def _prepend(first: TokenEvent, rest: AsyncGenerator[TokenEvent, None],
                   observed: Observed) -> AsyncGenerator[TokenEvent, None]:
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


async def _merged(streams: Sequence[AsyncIterator[TokenEvent]]
                  ) -> AsyncGenerator[tuple[int, TokenEvent], None]:
    """``(choice index, event)`` of every stream, as they come; the first failure ends it
    (and the other streams with it)."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, TokenEvent | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[TokenEvent]) -> None:
        try:
            async for event in stream:
                await queue.put((index, event))
        except Exception as exc:
            await queue.put((index, exc))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(tasks)
        while open_streams:
            index, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _sse(running: Sequence[_Running], chunk: Chunk, tail: Tail | None = None
         ) -> StreamingResponse:
    """Server-sent events: one chunk per event of any choice, ``tail(last events)`` (the
    usage chunk) when given, then ``[DONE]``; an error after the first bytes is an error
    event."""
    async def body() -> AsyncIterator[str]:
        try:
            try:
                last: dict[int, TokenEvent] = {}
                async for index, event in _merged([r.events for r in running]):
                    last[index] = event
                    yield f"data: {json.dumps(chunk(index, event))}\n\n"
                if tail is not None and len(last) == len(running):
                    yield f"data: {json.dumps(tail([last[i] for i in sorted(last)]))}\n\n"
            except Exception as exc:  # failed after the first bytes: say so, never cut
                _, error, _ = describe(exc)
                yield f"data: {json.dumps(error)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # client gone (or done): the rows leave the batch
            for r in running:
                r.handle.cancel()

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


async def _collect_unless_gone(request: Request, running: Sequence[_Running]
                               ) -> list[list[TokenEvent]]:
    """Every choice's whole result; a client that leaves first cancels the rows at once
    (a non-streaming request must not keep generating for nobody)."""
    work = asyncio.ensure_future(asyncio.gather(*(_gather(r.events) for r in running)))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            for r in running:
                r.handle.cancel()  # the rows leave the batch before the next step
            work.cancel()
    if not work.done() or work.cancelled():
        raise client_gone()
    return work.result()


async def answer(request: Request, service: Service, tenant: str, model: str,
                  stream: bool, *, rid: str, jobs: Sequence[Job], chunk: Chunk,
                  whole: Callable[[list[list[TokenEvent]]], Any],
                  tail: Tail | None = None) -> Any:
    """Run the ``jobs`` (one per choice, in choice order); ``whole(events per choice)``
    answers a non-streaming request, ``chunk(index, event)`` (and ``tail``) a streaming
    one."""
    bind_request(request_id=rid, tenant=tenant, model=model)
    running = await _start(service, tenant, model, rid, jobs)
    if stream:
        return _sse(running, chunk, tail)
    try:
        gathered = await _collect_unless_gone(request, running)
    finally:
        for r in running:
            r.handle.cancel()
    # _gather stops at the final event: end the streams now (their "request finished"
    # accounting and log lines), not whenever the generators are garbage-collected
    for r in running:
        await r.events.aclose()
    return whole(gathered)
