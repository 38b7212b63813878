"""What callers submit to the engine and what they get back.

``submit(GenerationRequest)`` returns a :class:`RequestHandle`: an async iterator of
:class:`TokenEvent` (one per generated token, the last one carrying ``finish_reason``) with
``cancel()``. A request that fails (its adapter could not be loaded, a step failed) raises
the typed error from the iterator.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Literal

from tessera.engine.sampling import SamplingParams
from tessera.engine.slots import AdapterLoader

FinishReason = Literal["stop", "length", "cancelled", "shutdown"]


@dataclass(frozen=True)
class AdapterSpec:
    """The adapter a request runs with: an immutable key (e.g. ``tenant/name@version`` or
    a content hash: one key always means the same weights) and an async loader returning
    the ``adapters.Adapter`` (host cache, Redis, HyperLoader generation: the server's)."""

    key: str
    loader: AdapterLoader


@dataclass(frozen=True)
class GenerationRequest:
    """Exactly one of ``prompt`` (text, tokenized with the tokenizer's BOS, or token ids)
    and ``messages`` (chat, rendered with the model's chat template)."""

    prompt: str | Sequence[int] | None = None
    messages: Sequence[Mapping[str, str]] | None = None
    adapter: AdapterSpec | None = None  # None = the base model
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class TokenEvent:
    token_id: int | None  # None only on a final event without a new token (cancelled)
    text: str  # decoded text delta (may be empty: an incomplete character, a held stop)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # tokens generated so far, this one included
    logprob: float | None = None  # log p(token_id) under the model's own distribution
    top_logprobs: tuple[tuple[int, float], ...] = ()  # the n most likely (asked for)


@dataclass(frozen=True)
class Completion:
    """A whole result, collected by :meth:`RequestHandle.result`."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


_Item = TokenEvent | BaseException


class RequestHandle:
    def __init__(self, request_id: str, prompt_tokens: int,
                 on_cancel: Callable[[], None]) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._on_cancel = on_cancel
        self.cancelled = False
        self.done = False  # the final event or error has been queued

    # --- scheduler side ---------------------------------------------------------------
    def put(self, item: _Item) -> None:
        if self.done:
            return
        if isinstance(item, BaseException) or item.finish_reason is not None:
            self.done = True
        self._queue.put_nowait(item)

    # --- caller side ------------------------------------------------------------------
    def cancel(self) -> None:
        """Client gone: the row leaves the batch before the next step (call on the loop)."""
        if not self.cancelled and not self.done:
            self.cancelled = True
            self._on_cancel()

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self.events()

    async def __aenter__(self) -> RequestHandle:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Leaving ``async with handle:`` before the final event cancels the request (an
        ``async for`` that breaks only cancels once its generator is closed or collected)."""
        self.cancel()

    async def events(self) -> AsyncGenerator[TokenEvent, None]:
        """Events until the final one; leaving the loop early cancels the request."""
        finished = False
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finish_reason is not None:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.cancel()

    async def result(self) -> Completion:
        ids, text, last = await collect(self)
        assert last.finish_reason is not None
        return Completion(ids, text, last.finish_reason, last.prompt_tokens,
                          last.completion_tokens)


async def collect(events: AsyncIterable[TokenEvent]) -> tuple[list[int], str, TokenEvent]:
    """Token ids, text and the final event of a whole event stream."""
    ids: list[int] = []
    text: list[str] = []
    async for event in events:
        if event.token_id is not None:
            ids.append(event.token_id)
        text.append(event.text)
        if event.finish_reason is not None:
            return ids, "".join(text), event
    raise RuntimeError("event stream ended without a finish reason")
