"""OpenAI-compatible bodies (``/v1/completions``, ``/v1/chat/completions``,
``/v1/models``): requests, answers and stream chunks in OpenAI's shapes, on the strict base
types of :mod:`tessera.server.schemas`. OpenAI fields tessera does not implement are refused
(400 naming the field) unless they carry their neutral value."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from tessera.engine.sampling import MAX_LOGPROBS
from tessera.server.schemas import Integral, MaxTokens, Messages, Prompt, Sampling, Strict


class StreamOptions(Strict):
    include_usage: bool = Field(False, description="a last chunk with the usage (and no "
                                                   "choices) before [DONE]")


# OpenAI fields tessera does not implement, with the value that means "not used": a request
# that sets one to anything else is refused (400 naming the field), never silently served
# as if it had not asked. Fields not listed here and unknown to OpenAI are ignored.
UNSUPPORTED_OPENAI_FIELDS: dict[str, Any] = {
    "n": 1, "best_of": 1, "echo": False, "suffix": None, "presence_penalty": 0,
    "frequency_penalty": 0, "repetition_penalty": 1, "logit_bias": None, "min_tokens": 0,
    "tools": None, "tool_choice": None, "parallel_tool_calls": None, "functions": None,
    "function_call": None, "response_format": None, "audio": None, "modalities": None,
    "prediction": None, "web_search_options": None, "reasoning_effort": None}
UNSUPPORTED_ERROR = "unsupported_field"  # answered 400 by tessera.server.http_errors


class OpenAISampling(Sampling):
    """OpenAI's extras on both endpoints: ``max_completion_tokens`` (wins over
    ``max_tokens``) and ``stream_options``; OpenAI fields tessera does not implement are
    refused unless they carry their neutral value."""

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, neutral in UNSUPPORTED_OPENAI_FIELDS.items():
                if name in data and data[name] not in (neutral, None, {}, []):
                    raise PydanticCustomError(
                        UNSUPPORTED_ERROR, "'{field}' is not supported by tessera "
                        "(only its default, {neutral!r}, is accepted)",
                        {"field": name, "neutral": neutral})
        return data

    max_completion_tokens: MaxTokens | None = Field(None, description=(
        "tokens to generate; replaces max_tokens (same limits)"))
    stream_options: StreamOptions | None = None

    def token_limit(self) -> int | None:
        return (self.max_completion_tokens if self.max_completion_tokens is not None
                else self.max_tokens)


class CompletionIn(OpenAISampling):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use
    model: str = Field(min_length=1, description=(
        "task name (the name rule: 400 invalid_name otherwise), or the base model's alias"))
    prompt: Prompt
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), Integral] | None = Field(
        None, description="log-probabilities of each token and of its n most likely "
                          "alternatives (n = this value)")
    user: str | None = None

    def top_logprobs(self) -> int | None:
        """None = no logprobs in the answer; else the alternatives per token."""
        return self.logprobs


class ChatIn(OpenAISampling):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, description=(
        "task name (the name rule: 400 invalid_name otherwise), or the base model's alias"))
    messages: Messages
    logprobs: bool = Field(False, description="log-probabilities of each output token")
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), Integral] | None = Field(
        None, description="with logprobs: the n most likely alternatives per token")
    user: str | None = None

    def top_logprob_count(self) -> int | None:
        """None = no logprobs in the answer; else the alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions shape, per generated token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class CompletionOut(BaseModel):
    """``/v1/completions`` (OpenAI's shape)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatReply(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatReply
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletionOut(BaseModel):
    """``/v1/chat/completions`` (OpenAI's shape)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


# --- stream chunks (the data of one server-sent event) ----------------------------------
class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]  # empty in the usage chunk
    usage: Usage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatDeltaChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatDeltaChoice]  # empty in the usage chunk
    usage: Usage | None = None


class ModelCard(BaseModel):
    """A model as vLLM lists LoRA adapters: a task's ``parent`` and ``root`` are the base."""

    id: str
    object: Literal["model"] = "model"
    owned_by: str
    created: int = 0
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
