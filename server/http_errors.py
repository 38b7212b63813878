"""The one place where errors become HTTP responses.

Every error body has one shape, which serves tessera's clients and OpenAI's alike:
``{"error": {"message", "type", "param", "code", "field"}}``. ``type`` is the
machine-readable kind (``invalid_name``, ``queue_full``...), ``code`` the same kind where
OpenAI clients read it (``BadRequestError.code``: ``context_length_exceeded``,
``unsupported_field``...), ``param`` the request field, form part, tensor or config key to
blame (null when none), and ``field`` the same name, present only when there is one
(tessera's older name). Domain errors of the adapter core, the store and the engine are
mapped by class in :func:`status_for`; routes raise them (or :class:`ApiError`) and never
build error responses themselves.

A request body that fails validation is 422 on tessera's own routes and 400 on the
OpenAI-compatible ones (the routes tagged :data:`OPENAI_TAG`), as OpenAI and vLLM answer;
a name breaking the name rule, a refused field (``unsupported_field``) and a bad path
parameter are 400 everywhere.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError as PydanticRequestError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tessera.adapters.errors import (
    AdapterError,
    AdapterValidationError,
    NotMergeableError,
    PoolError,
    UnknownMethodError,
    UnsafeFormatError,
    UnsupportedAdapterError,
)
from tessera.engine.errors import (
    AdapterLoadError,
    ContextLengthError,
    EngineError,
    EngineStoppedError,
    PromptTooLargeError,
    QueueFullError,
    RowError,
    StepError,
)
from tessera.engine.errors import RequestValidationError as EngineRequestError
from tessera.server.schemas import NAME_ERROR, UNSUPPORTED_ERROR
from tessera.store.errors import (
    ConflictError,
    IntegrityError,
    InvalidNameError,
    NotFoundError,
    StoreError,
    StoreUnavailableError,
)

log = logging.getLogger(__name__)
# The OpenAPI tag of the OpenAI- (and vLLM-) compatible routes: their validation errors
# are 400, as OpenAI's and vLLM's are.
OPENAI_TAG = "OpenAI-compatible"


class ApiError(Exception):
    """An HTTP-level error raised by the server itself (auth, upload limits, formats)."""

    def __init__(self, status: int, type_: str, message: str, *, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.type = type_
        self.message = message
        self.field = field
        self.headers = headers or {}
        super().__init__(message)


def unauthorized(message: str = "missing or invalid API key") -> ApiError:
    return ApiError(401, "unauthorized", message,
                    headers={"WWW-Authenticate": 'Bearer realm="tessera"'})


def not_found(message: str) -> ApiError:
    return ApiError(404, "not_found", message)


def client_gone() -> ApiError:
    """The client disconnected before its non-streaming answer was ready; the request was
    cancelled. Nobody reads this response (499: nginx's "client closed request")."""
    return ApiError(499, "client_closed_request",
                    "the client closed the connection; the request was cancelled")


# class -> (status, type); the first matching entry wins (subclasses before bases)
_STATUS: tuple[tuple[type[BaseException], int, str], ...] = (
    (InvalidNameError, 400, "invalid_name"),
    (NotFoundError, 404, "not_found"),
    (ConflictError, 409, "conflict"),
    (StoreUnavailableError, 503, "store_unavailable"),  # StoreFullError included
    (IntegrityError, 500, "integrity_error"),
    (StoreError, 500, "store_error"),
    (UnsafeFormatError, 415, "unsafe_format"),
    (AdapterValidationError, 422, "adapter_invalid"),
    (UnsupportedAdapterError, 422, "adapter_unsupported"),
    (UnknownMethodError, 422, "unknown_method"),
    (PoolError, 422, "adapter_invalid"),
    (NotMergeableError, 422, "adapter_invalid"),
    (AdapterError, 422, "adapter_invalid"),
    (ContextLengthError, 400, "context_length_exceeded"),
    (PromptTooLargeError, 400, "context_length_exceeded"),
    (EngineRequestError, 400, "invalid_request"),
    (QueueFullError, 429, "queue_full"),
    (EngineStoppedError, 503, "unavailable"),
    (RowError, 500, "generation_failed"),
    (StepError, 503, "step_failed"),
    (EngineError, 503, "engine_error"),
)


def _unwrap(exc: BaseException) -> BaseException:
    """An adapter that failed to load answers as its cause (422 when it is invalid)."""
    if isinstance(exc, AdapterLoadError) and isinstance(
            exc.cause, AdapterError | StoreError | EngineError):
        return exc.cause
    return exc


def status_for(exc: BaseException) -> tuple[int, str]:
    exc = _unwrap(exc)
    for cls, status, type_ in _STATUS:
        if isinstance(exc, cls):
            return status, type_
    return 500, "internal_error"


def error_body(type_: str, message: str, field: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"message": message, "type": type_, "param": field,
                             "code": type_}
    if field is not None:
        error["field"] = field
    return {"error": error}


def describe(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """``(status, body, headers)`` of any error: the one mapping behind HTTP error
    responses and the error events of streams that already started."""
    if isinstance(exc, ApiError):
        return exc.status, error_body(exc.type, exc.message, exc.field), exc.headers
    status, type_ = status_for(exc)
    inner = _unwrap(exc)
    headers: dict[str, str] = {}
    field: str | None = None
    if isinstance(inner, QueueFullError):
        headers["Retry-After"] = str(inner.retry_after_s)
    if isinstance(inner, AdapterValidationError):
        field = inner.tensor
    if status >= 500:
        log.error("request failed", extra={"error": type(inner).__name__,
                                           "detail": str(inner)}, exc_info=inner)
    return status, error_body(type_, str(exc if status < 500 else inner), field), headers


def to_response(exc: BaseException) -> JSONResponse:
    """The JSON response of any error (also used inside streams, before the first byte)."""
    status, body, headers = describe(exc)
    return JSONResponse(body, status, headers=headers)


_UNION_TAG = re.compile(r"[-\[\]()]")  # pydantic's name of a union member, not a field


def _field_of(loc: Sequence[Any]) -> str:
    """``a.b.0`` of a validation error's location, without where it was (body, path...)
    and without pydantic's union-member tags (``constrained-str``, ``list[int]``)."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] or parts
    return ".".join(p for p in parts if not _UNION_TAG.search(p))


def is_openai_route(request: Request) -> bool:
    """The request was routed to an OpenAI-compatible route (tagged :data:`OPENAI_TAG`)."""
    route = request.scope.get("route")
    return OPENAI_TAG in (getattr(route, "tags", None) or ())


def _pick(errors: Sequence[Any], invalid: int = 422) -> tuple[int, str, dict[str, Any]]:
    """``(status, type, error)`` of a request that failed validation: a name breaking the
    name rule answers 400 ``invalid_name`` (DESIGN: a body field or a path parameter alike),
    a refused field 400 ``unsupported_field``, another bad path parameter 400, anything
    else ``invalid`` (422; 400 on the OpenAI-compatible routes); names first, then the
    path."""
    for error in errors:
        if error.get("type") == NAME_ERROR:
            return 400, "invalid_name", error
        if error.get("type") == UNSUPPORTED_ERROR:  # refused by design: name the field
            name = str(error.get("ctx", {}).get("field", ""))
            return 400, "unsupported_field", {**error, "loc": (*error.get("loc", ()), name)}
    for error in errors:
        if tuple(error.get("loc", ()))[:1] == ("path",):
            return 400, "invalid_request", error
    if not errors:
        return invalid, "invalid_request", {"loc": (), "msg": "invalid request"}
    # a union (str | list[int]) fails once per member: the deepest error of the first field
    # names what went wrong ("prompt.1: not an integer", not "prompt: not a string")
    field = tuple(errors[0].get("loc", ()))[:2]
    same = [e for e in errors if tuple(e.get("loc", ()))[:2] == field]
    return invalid, "invalid_request", max(same, key=lambda e: len(e.get("loc", ())))


def install(app: FastAPI) -> None:
    """Register the handlers on ``app`` (the only exception handlers of the service)."""

    async def on_domain(_: Request, exc: Exception) -> JSONResponse:
        return to_response(exc)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, PydanticRequestError)
        status, type_, first = _pick(exc.errors(), 400 if is_openai_route(request) else 422)
        field = "body" if first.get("type") == "json_invalid" else _field_of(
            first.get("loc", ()))
        msg = str(first.get("msg", "invalid value"))
        message = f"{field}: {msg}" if field and type_ != "invalid_name" else msg
        return JSONResponse(error_body(type_, message, field or None), status)

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if isinstance(exc.__cause__, RecursionError):  # FastAPI's body parse, too deep
            return JSONResponse(error_body(
                "invalid_request", "the JSON body is nested too deeply to parse", "body"),
                400)
        type_ = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(type_, str(exc.detail)), exc.status_code,
                            headers=dict(exc.headers or {}))

    for cls in (ApiError, AdapterError, StoreError, EngineError):
        app.add_exception_handler(cls, on_domain)
    app.add_exception_handler(PydanticRequestError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
