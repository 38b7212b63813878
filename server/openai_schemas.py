"""OpenAI-compatible bodies (``/v1/completions``, ``/v1/chat/completions``,
``/v1/models``, vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``):
requests, answers and stream chunks in OpenAI's shapes, on the strict base types of
:mod:`tessera.server.schemas`. OpenAI fields tessera does not implement are refused
(400 ``unsupported_field`` naming the field) unless they carry their neutral value."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from tessera.engine.sampling import MAX_LOGPROBS
from tessera.server.schemas import (
    AdapterName,
    Integral,
    MaxTokens,
    Messages,
    Sampling,
    Strict,
    TextPrompt,
    TokenPrompt,
    unsupported,
)

# Static ceilings (400 above them); the server's max_choices setting bounds n x prompts.
MAX_N_CAP = 128  # OpenAI's limit on n
MAX_PROMPTS_CAP = 128  # prompts in one /v1/completions batch


class StreamOptions(Strict):
    include_usage: bool = Field(False, description="a last chunk with the usage (and no "
                                                   "choices) before [DONE]")


# OpenAI fields tessera does not implement, with the value that means "not used": a request
# that sets one to anything else is refused (400 naming the field), never silently served
# as if it had not asked. Fields not listed here and unknown to OpenAI are ignored.
UNSUPPORTED_OPENAI_FIELDS: dict[str, Any] = {
    "best_of": 1, "suffix": None, "tools": None, "tool_choice": None,
    "parallel_tool_calls": None, "functions": None, "function_call": None,
    "response_format": None, "audio": None, "modalities": None, "prediction": None,
    "web_search_options": None, "reasoning_effort": None}


class OpenAISampling(Sampling):
    """OpenAI's extras on both endpoints: ``n``, ``max_completion_tokens`` (wins over
    ``max_tokens``) and ``stream_options``; OpenAI fields tessera does not implement
    (:attr:`REFUSED`) are refused unless they carry their neutral value."""

    REFUSED: ClassVar[dict[str, Any]] = UNSUPPORTED_OPENAI_FIELDS

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, neutral in cls.REFUSED.items():
                if name in data and data[name] not in (neutral, None, {}, []):
                    raise unsupported(name, "'{field}' is not supported by tessera (only its "
                                      "default, {neutral}, is accepted)",
                                      neutral=json.dumps(neutral))
        return data

    max_completion_tokens: MaxTokens | None = Field(None, description=(
        "tokens to generate; replaces max_tokens (same limits)"))
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N_CAP), Integral] = Field(1, description=(
        "independent choices (each its own request; with a seed, choice i uses seed + i); "
        "n x prompts at most the server's max_choices (default 16): 400 otherwise"))

    def token_limit(self) -> int | None:
        return (self.max_completion_tokens if self.max_completion_tokens is not None
                else self.max_tokens)


TextBatch = Annotated[list[TextPrompt], Field(min_length=1, max_length=MAX_PROMPTS_CAP,
                                              description="a batch: one choice per prompt")]


def _prompt_kind(value: Any) -> str:
    """The one member of the prompt union a value can be (so that a validation error
    names what went wrong in that member, not in all three)."""
    if isinstance(value, str):
        return "str"
    if isinstance(value, list) and value and isinstance(value[0], str):
        return "list[str]"
    return "list[int]"


CompletionPrompt = Annotated[
    Annotated[TextPrompt, Tag("str")] | Annotated[TokenPrompt, Tag("list[int]")]
    | Annotated[TextBatch, Tag("list[str]")], Discriminator(_prompt_kind)]


class CompletionIn(OpenAISampling):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use
    model: str = Field(min_length=1, description=(
        "task name (the name rule: 400 invalid_name otherwise), or the base model's alias"))
    prompt: CompletionPrompt = Field(description=(
        "text, token ids, or a list of texts (choices are ordered prompt by prompt, n "
        "each); a list of token-id lists is refused"))
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), Integral] | None = Field(
        None, description="log-probabilities of each token and of its n most likely "
                          "alternatives (n = this value)")
    echo: bool = Field(False, description="the prompt's text before each choice's text "
                                          "(not with logprobs: 400)")
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_token_batches(cls, data: Any) -> Any:
        if isinstance(data, dict):
            prompt = data.get("prompt")
            if isinstance(prompt, list) and any(isinstance(p, list) for p in prompt):
                raise unsupported("prompt", "a batch of token-id prompts is not supported "
                                  "by tessera: send one token-id prompt per request, or a "
                                  "list of strings")
        return data

    @model_validator(mode="after")
    def _echo_without_logprobs(self) -> CompletionIn:
        if self.echo and self.logprobs is not None:
            raise unsupported("echo", "'echo' with 'logprobs' is not supported by tessera: "
                              "the prompt tokens' log-probabilities are not computed (send "
                              "one of the two)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the batch (one unless a list of strings was sent)."""
        prompt = self.prompt
        if isinstance(prompt, list) and isinstance(prompt[0], str):
            return [str(p) for p in prompt]
        return [prompt]

    def top_logprobs(self) -> int | None:
        """None = no logprobs in the answer; else the alternatives per token."""
        return self.logprobs


class ChatIn(OpenAISampling):
    model_config = ConfigDict(extra="ignore")
    # vLLM's chat "echo" (repeat the last message) is not implemented either
    REFUSED: ClassVar[dict[str, Any]] = {**UNSUPPORTED_OPENAI_FIELDS, "echo": False}
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


# --- vLLM's adapter management ------------------------------------------------------------
MAX_LORA_PATH = 4096


class LoadLoraIn(Strict):
    """vLLM's ``/v1/load_lora_adapter``: a PEFT folder under the server's adapter root
    becomes the caller's adapter ``lora_name`` (a new version) and the task ``lora_name``
    is bound to it, so ``model: lora_name`` serves it."""

    lora_name: AdapterName
    lora_path: str = Field(min_length=1, max_length=MAX_LORA_PATH, description=(
        "a folder holding adapter_config.json and adapter_model.safetensors: absolute "
        "inside the server's adapter root, or relative to it"))
    load_inplace: bool = Field(False, description=(
        "replace an adapter already loaded under that name (400 otherwise, as vLLM)"))


class UnloadLoraIn(Strict):
    """vLLM's ``/v1/unload_lora_adapter``: the task ``lora_name`` is unbound (its stored
    versions stay)."""

    lora_name: AdapterName


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
