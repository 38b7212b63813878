"""Request and response bodies and path parameters of the HTTP API (pydantic).

The OpenAPI document says what is enforced, so that a generated client and a fuzzer agree
with the server: request bodies are strict (JSON types are not coerced: ``"ignore_eos": 0``
and ``"prompt": [false]`` are refused, not read as booleans / integers), unknown fields are
refused where a typo would silently change behaviour, optional fields whose ``null`` would
be ambiguous must be omitted rather than sent as ``null``, and every name carries the name
rule of :mod:`tessera.store.names` (its regex, plus its "no ``..``" rule as a lookahead).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from fastapi import Path
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)
from pydantic_core import PydanticCustomError

from tessera.engine.sampling import (
    LOGIT_BIAS_LIMIT,
    MAX_LOGIT_BIAS,
    MAX_REPETITION_PENALTY,
    PENALTY_LIMIT,
)
from tessera.store.errors import InvalidNameError
from tessera.store.models import AdapterVersion, Binding, HypernetVersion
from tessera.store.names import MAX_NAME_LENGTH, NAME_RE, check_name

# --- names ------------------------------------------------------------------------------
# The schema's pattern is tessera.store.names' regex, anchored, with check_name's "no '..'" rule as
# a lookahead; validation is check_name itself (so its message, answered 400 invalid_name
# by tessera.server.http_errors for a body field and a path parameter alike).
NAME_PATTERN = rf"^(?!.*\.\.)(?:{NAME_RE.pattern})$"
NAME_SCHEMA: dict[str, Any] = {"pattern": NAME_PATTERN, "minLength": 1,
                               "maxLength": MAX_NAME_LENGTH}
NAME_ERROR = "invalid_name"  # the validation error type tessera.server.http_errors answers 400


def name_rule(what: str) -> AfterValidator:
    """Validate a name with :func:`tessera.store.names.check_name` (error type ``invalid_name``)."""

    def check(value: str) -> str:
        try:
            return check_name(value, what)
        except InvalidNameError as exc:
            raise PydanticCustomError(NAME_ERROR, str(exc)) from None

    return AfterValidator(check)


def _name_field(what: str) -> Any:
    return Field(description=f"{what} name: letters, digits, '.', '_', '-'; starting with a "
                             f"letter or digit; no '..'; at most {MAX_NAME_LENGTH} characters",
                 json_schema_extra=NAME_SCHEMA)


def _name_param(what: str) -> Any:
    return Path(description=f"{what} name (the name rule; 400 invalid_name otherwise)",
                json_schema_extra=NAME_SCHEMA)


AdapterName = Annotated[str, name_rule("adapter"), _name_field("adapter")]
HypernetName = Annotated[str, name_rule("hypernetwork"), _name_field("hypernetwork")]
TaskName = Annotated[str, name_rule("task"), _name_field("task")]
NewTenantName = Annotated[str, name_rule("tenant"), _name_field("tenant")]

AdapterParam = Annotated[str, name_rule("adapter"), _name_param("adapter")]
HypernetParam = Annotated[str, name_rule("hypernetwork"), _name_param("hypernetwork")]
TaskParam = Annotated[str, name_rule("task"), _name_param("task")]
TenantParam = Annotated[str, name_rule("tenant"), _name_param("tenant")]

# Integers a JSON number carries exactly in every parser (I-JSON, RFC 7493): versions and
# revisions (Redis counters, read by Lua as doubles) and seeds. A bound above it would not
# even survive the schema's own JSON (2**63 reads back as a float).
MAX_JSON_INT = 2**53 - 1
VersionParam = Annotated[int, Path(ge=1, le=MAX_JSON_INT, description="version (from 1)")]


# --- strictness -------------------------------------------------------------------------
def _not_null(value: Any) -> Any:
    if value is None:
        raise PydanticCustomError("not_null", "omit the field instead of sending null")
    return value


def _without_null(schema: dict[str, Any]) -> None:
    """The JSON schema of an :data:`Omittable` field: its type without ``null`` (and
    without ``"default": null``)."""
    variants = [v for v in schema.pop("anyOf", []) if v != {"type": "null"}]
    if len(variants) == 1:
        schema.update(variants[0])
    elif variants:
        schema["anyOf"] = variants
    if schema.get("default", ...) is None:
        del schema["default"]


def _integral(value: Any) -> Any:
    """JSON Schema's integer: ``2.0`` is one (an encoder may write an integer so); a string
    or a boolean still is not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Request integers: strict (no "1", no true) but integral floats, as JSON Schema reads them.
# Bounds go inside (before the validator), so that they stay minimum / maximum in the schema.
Integral = BeforeValidator(_integral)
Version = Annotated[int, Field(ge=1, le=MAX_JSON_INT), Integral]
Natural = Annotated[int, Field(ge=0, le=MAX_JSON_INT), Integral]

T = TypeVar("T")
# An optional field that is omitted, never sent as null (its JSON schema has no null), so
# that "exactly one of" (oneOf + required) says exactly what the server enforces.
Omittable = Annotated[T | None, BeforeValidator(_not_null),
                      Field(json_schema_extra=_without_null)]


class Strict(BaseModel):
    """A request body: JSON types as declared (no coercion), unknown fields refused."""

    model_config = ConfigDict(extra="forbid", strict=True)


# --- management -------------------------------------------------------------------------
class TenantCreate(Strict):
    name: NewTenantName


class TenantCreated(BaseModel):
    name: str
    api_key: str = Field(description="shown once; store it now")


class AdapterVersionOut(BaseModel):
    name: str
    version: int
    method: str
    format: str
    sha256: str
    size: int
    created: float
    uploader: str
    metadata: dict[str, str]

    @classmethod
    def of(cls, record: AdapterVersion) -> AdapterVersionOut:
        return cls(name=record.name, version=record.version, method=record.method,
                   format=record.format, sha256=record.sha256, size=record.size,
                   created=record.created, uploader=record.uploader,
                   metadata=record.metadata)


class AdapterOut(BaseModel):
    name: str
    versions: list[AdapterVersionOut]


class AdapterList(BaseModel):
    adapters: list[str]


class Activate(Strict):
    """Bind a task to ``adapter`` ``version``, or to HyperLoader task ``hyper_task`` of
    ``hypernetwork`` ``version`` (its adapter is generated on the first request)."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["adapter"],
         "not": {"anyOf": [{"required": ["hypernetwork"]}, {"required": ["hyper_task"]}]}},
        {"required": ["hypernetwork", "hyper_task"], "not": {"required": ["adapter"]}},
    ]})

    adapter: Omittable[AdapterName] = None
    hypernetwork: Omittable[HypernetName] = None
    hyper_task: Omittable[TaskName] = None
    version: Version
    expected_revision: Natural | None = Field(None, description=(
        "bind only if the task's revision is still this one (409 otherwise)"))

    @model_validator(mode="after")
    def _one_target(self) -> Activate:
        if (self.adapter is None) == (self.hypernetwork is None):
            raise ValueError("send exactly one of 'adapter' or 'hypernetwork'")
        if (self.hypernetwork is None) != (self.hyper_task is None):
            raise ValueError("'hypernetwork' and 'hyper_task' go together")
        return self


class Deactivate(Strict):
    expected_revision: Natural | None = None


class TaskOut(BaseModel):
    """``adapter`` + ``version``, or ``hypernetwork`` + ``version`` + ``hyper_task``."""

    task: str
    adapter: str | None
    version: int | None
    revision: int
    updated: float | None = None
    actor: str | None = None
    hypernetwork: str | None = None
    hyper_task: str | None = None

    @classmethod
    def of(cls, binding: Binding) -> TaskOut:
        generated = binding.hyper_task is not None
        return cls(task=binding.task, adapter=None if generated else binding.adapter,
                   version=binding.version, revision=binding.revision,
                   updated=binding.updated, actor=binding.actor,
                   hypernetwork=binding.adapter if generated else None,
                   hyper_task=binding.hyper_task)


class HypernetOut(BaseModel):
    name: str
    version: int
    sha256: str
    size: int
    created: float
    uploader: str
    config: dict[str, Any]
    tasks: list[str]

    @classmethod
    def of(cls, record: HypernetVersion) -> HypernetOut:
        return cls(name=record.name, version=record.version, sha256=record.sha256,
                   size=record.size, created=record.created, uploader=record.uploader,
                   config=record.config, tasks=list(record.tasks))


class HypernetList(BaseModel):
    hypernetworks: list[str]


class HypernetVersions(BaseModel):
    name: str
    versions: list[HypernetOut]


class TaskList(BaseModel):
    tasks: list[TaskOut]


# --- inference --------------------------------------------------------------------------
# Static ceilings, enforced here (422); the engine's configured limits apply on top of them
# (EngineSettings.max_tokens_limit, max_stop_sequences, max_stop_length; defaults 4096, 8,
# 128), answered 400 naming the limit, as is prompt + max_tokens over the context. The
# OpenAPI document states the tighter of the two (tessera.server.api.openapi.document_limits).
MAX_TOKENS_CAP = 1 << 20
MAX_STOP_SEQUENCES_CAP = 64
MAX_STOP_LENGTH_CAP = 1024
MAX_CONTENT_PARTS = 64  # text parts of one chat message
# A request field tessera refuses by design (an OpenAI field it does not implement, a
# combination it cannot serve, a chat content part that is not text): answered 400
# ``unsupported_field`` naming it by tessera.server.http_errors. Raise it with
# ``{"field": name}`` in the context: the field is ``name`` below where it was raised.
UNSUPPORTED_ERROR = "unsupported_field"


def unsupported(field: str, message: str, **context: Any) -> PydanticCustomError:
    """The validation error of a refused field (``message`` may use ``{field}`` and
    ``context``'s names, formatted with ``str``: no conversions such as ``!r``)."""
    return PydanticCustomError(UNSUPPORTED_ERROR, message, {"field": field, **context})


StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH_CAP)]
TokenId = Annotated[int, Field(ge=0), Integral]
MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS_CAP), Integral]
TextPrompt = Annotated[str, Field(min_length=1, description="text, tokenized with BOS")]
TokenPrompt = Annotated[list[TokenId], Field(min_length=1, description=(
    "token ids, each in [0, vocabulary size); 400 for one outside it"))]
Prompt = TextPrompt | TokenPrompt
# a JSON object's key naming a token id: decimal, no sign, no leading zero (one spelling
# per id, so two keys never name one token)
TokenKey = Annotated[str, Field(pattern=r"^(0|[1-9][0-9]{0,9})$")]
Bias = Annotated[float, Field(ge=-LOGIT_BIAS_LIMIT, le=LOGIT_BIAS_LIMIT, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-PENALTY_LIMIT, le=PENALTY_LIMIT, allow_inf_nan=False)]


class Sampling(Strict):
    max_tokens: MaxTokens | None = Field(None, description=(
        "tokens to generate (null = the server's default_max_tokens); at most the server's "
        "max_tokens_limit (default 4096), and prompt + max_tokens at most the context: 400 "
        "naming the numbers otherwise"))
    temperature: float = Field(1.0, ge=0.0, le=100.0, allow_inf_nan=False,
                               description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: Annotated[int, Field(ge=0), Integral] = Field(0, description="0 = off")
    seed: Natural | None = None
    stop: StopString | Annotated[list[StopString], Field(
        max_length=MAX_STOP_SEQUENCES_CAP)] | None = Field(None, description=(
            "stop sequences, matched on the decoded text; at most the server's "
            "max_stop_sequences (default 8) of at most max_stop_length characters (default "
            "128): 400 otherwise"))
    stream: bool = Field(False, description="server-sent events instead of one JSON body")
    ignore_eos: bool = False
    presence_penalty: Penalty = Field(0.0, description=(
        "OpenAI's: subtracted once from the logit of every token already generated"))
    frequency_penalty: Penalty = Field(0.0, description=(
        "OpenAI's: subtracted from a token's logit once per time it was generated"))
    repetition_penalty: float = Field(
        1.0, gt=0.0, le=MAX_REPETITION_PENALTY, allow_inf_nan=False, description=(
            "vLLM's / transformers': the logit of a token in the prompt or the output is "
            "divided by it when positive, multiplied by it otherwise (1 = off)"))
    logit_bias: Annotated[dict[TokenKey, Bias], Field(
        max_length=MAX_LOGIT_BIAS, json_schema_extra={"additionalProperties": False})] | None = (
        Field(None, description="token id (a decimal string) -> bias added to its logit "
                                "before sampling; -100 bans a token, +100 all but forces it"))
    min_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS_CAP), Integral] = Field(
        0, description="vLLM's: the model's EOS tokens are suppressed until this many tokens "
                       "were generated (stop strings still apply); at most max_tokens")

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as (token id, bias) pairs."""
        return tuple((int(k), v) for k, v in (self.logit_bias or {}).items())


class TextPart(BaseModel):
    """A chat content part: only text (``{"type": "text", "text": ...}``)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and "type" in data and data["type"] != "text":
            raise unsupported("type", "content part type {kind} is not supported by "
                              "tessera (only 'text' parts)", kind=repr(data["type"])[:64])
        return data


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS)] = Field(
        description="text, or a list of text parts (joined with newlines, as vLLM does)")

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


Messages = Annotated[list[ChatMessage], Field(min_length=1)]


class GenerateIn(Sampling):
    """Exactly one of ``prompt`` and ``messages`` (rendered with the chat template)."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["prompt"], "not": {"required": ["messages"]}},
        {"required": ["messages"], "not": {"required": ["prompt"]}},
    ]})

    prompt: Omittable[Prompt] = None
    messages: Omittable[Messages] = None

    @model_validator(mode="after")
    def _one_input(self) -> GenerateIn:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of 'prompt' or 'messages'")
        return self


class GenerateOut(BaseModel):
    id: str
    task: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


# --- stream chunks (the data of one server-sent event) ----------------------------------
class GenerateChunk(BaseModel):
    id: str
    text: str
    token_id: int | None
    finish_reason: str | None


JSONDict = dict[str, Any]

