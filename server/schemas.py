"""Request and response bodies of the HTTP API (pydantic; unknown fields refused where a
typo would silently change behaviour)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from store.models import AdapterVersion, Binding, HypernetVersion


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- management -------------------------------------------------------------------------
class TenantCreate(Strict):
    name: str = Field(min_length=1, max_length=256)


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

    adapter: str | None = Field(None, min_length=1, max_length=256)
    hypernetwork: str | None = Field(None, min_length=1, max_length=256)
    hyper_task: str | None = Field(None, min_length=1, max_length=256)
    version: int = Field(ge=1)
    expected_revision: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one_target(self) -> Activate:
        if (self.adapter is None) == (self.hypernetwork is None):
            raise ValueError("send exactly one of 'adapter' or 'hypernetwork'")
        if (self.hypernetwork is None) != (self.hyper_task is None):
            raise ValueError("'hypernetwork' and 'hyper_task' go together")
        return self


class Deactivate(Strict):
    expected_revision: int | None = Field(None, ge=0)


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


class TaskList(BaseModel):
    tasks: list[TaskOut]


# --- inference --------------------------------------------------------------------------
class Sampling(Strict):
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    ignore_eos: bool = False

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class GenerateIn(Sampling):
    prompt: str | list[int] | None = None
    messages: list[ChatMessage] | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class CompletionIn(Sampling):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use
    model: str = Field(min_length=1)
    prompt: str | list[int]
    user: str | None = None


class ChatIn(Sampling):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    user: str | None = None


class GenerateOut(BaseModel):
    id: str
    task: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str
    created: int = 0


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


JSONDict = dict[str, Any]

GenerateIn.model_rebuild()
