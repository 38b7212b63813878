"""Typed errors of the engine. The HTTP layer maps each class to one status (one place)."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class RequestValidationError(EngineError):
    """A request the engine cannot run as given (HTTP 400/422): bad sampling values, too
    many stop sequences, empty prompt, max_tokens over the limit."""


class ContextLengthError(RequestValidationError):
    """prompt + max_tokens exceeds the context limit (HTTP 400); names both numbers."""

    def __init__(self, prompt_tokens: int, max_tokens: int, limit: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.limit = limit
        super().__init__(
            f"prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: "
            f"{prompt_tokens + max_tokens} exceeds the context limit of {limit} tokens")


class PromptTooLargeError(RequestValidationError):
    """A prompt refused by its byte length before it is tokenized: it cannot fit the
    context in any tokenization (HTTP 400, like :class:`ContextLengthError`)."""

    def __init__(self, size: int, max_bytes: int, limit: int) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.limit = limit
        super().__init__(f"prompt is {size} bytes: more than the {max_bytes} bytes that can "
                         f"fit the context limit of {limit} tokens with this tokenizer")


class QueueFullError(EngineError):
    """The bounded queue is full (HTTP 429); ``retry_after_s`` is the Retry-After hint."""

    def __init__(self, queue_depth: int, retry_after_s: int) -> None:
        self.queue_depth = queue_depth
        self.retry_after_s = retry_after_s
        super().__init__(f"queue full ({queue_depth} requests waiting); "
                         f"retry after {retry_after_s} s")


class EngineStoppedError(EngineError):
    """The engine is not running or is shutting down (HTTP 503)."""


class AdapterLoadError(EngineError):
    """Loading an adapter into a device slot failed (validation error, out of memory, the
    loader's exception). Only the requests waiting for that adapter fail; ``cause`` is
    the original exception (an ``AdapterValidationError`` maps to 422, others to 503)."""

    def __init__(self, key: str, cause: BaseException) -> None:
        self.key = key
        self.cause = cause
        super().__init__(f"adapter {key!r} could not be loaded: {cause}")


class RowError(EngineError):
    """A failure that belongs to one request of a step (its sampling, stop strings,
    detokenization, non-finite logits from its adapter): that request fails with this
    error, every other row of the batch goes on (HTTP 500 before the first byte; an SSE
    error event after it)."""


class StepError(EngineError):
    """A forward step failed (e.g. device out of memory); the rows in it fail, the engine
    keeps serving (HTTP 503)."""
