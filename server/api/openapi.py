"""What the OpenAPI document declares beyond the route signatures: the error responses
(one body shape, :func:`tessera.server.http_errors.error_body`), the multipart request bodies of
the upload routes, which read their form by hand (:mod:`tessera.server.uploads`), the event streams
of the inference routes, and the configured generation limits (:func:`document_limits`).

Routers attach the codes every one of their routes can answer (``APIRouter(responses=
AUTHENTICATED)``); a route adds its own on its decorator. Every route with parameters or a
body declares its 422 with the error body, which keeps FastAPI's default 422
(``{"detail": [...]}``, a shape this server never answers) out of the document.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field
from pydantic.json_schema import SkipJsonSchema

from tessera.engine.settings import EngineSettings


class ErrorDetail(BaseModel):
    message: str = Field(description="what went wrong, naming the numbers involved")
    type: str = Field(description="machine-readable kind, e.g. 'invalid_name', 'queue_full'")
    param: str | None = Field(description="OpenAI's name of `field`: the field to blame, "
                                          "or null")
    code: str = Field(description="the same kind as `type`, where OpenAI clients read it")
    field: str | SkipJsonSchema[None] = Field(
        None, description="the request field, form part, tensor or config key to blame; "
                          "absent when none is")


class ErrorBody(BaseModel):
    """The one error shape of every status >= 400."""

    error: ErrorDetail


Responses = dict[int | str, dict[str, Any]]

_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying",
                                "required": True, "schema": {"type": "integer", "minimum": 1}}}
_WWW_AUTHENTICATE = {"WWW-Authenticate": {"description": "the authentication scheme (Bearer)",
                                          "schema": {"type": "string"}}}

_ERRORS: dict[int, tuple[str, dict[str, Any]]] = {
    400: ("Bad input: a name breaking the name rule (type 'invalid_name'), a refused "
          "field (type 'unsupported_field'), a malformed path parameter, multipart body or "
          "archive, prompt + max_tokens over the context (both numbers given), a limit of "
          "the server's configuration; on the OpenAI-compatible routes also a field failing "
          "validation", {}),
    401: ("Missing or invalid API key", _WWW_AUTHENTICATE),
    403: ("The key is valid but not for this endpoint (admin key on a tenant route or "
          "the reverse)", {}),
    404: ("Unknown, or owned by another tenant (the two are indistinguishable)", {}),
    409: ("Conflict: the name already exists, a compare-and-set lost "
          "(expected_revision), or a task is still bound to the version", {}),
    413: ("The request body exceeds the server's limit (max_upload_bytes for uploads, "
          "max_request_bytes otherwise; refused before it is buffered whole)", {}),
    415: ("Not multipart/form-data, or a pickle-based / non-safetensors weights file "
          "(nothing was loaded)", {}),
    422: ("A field fails validation (type, bound, required; 400 on the OpenAI-compatible "
          "routes), or the adapter is invalid (the field names the tensor or config key)",
          {}),
    429: ("The queue is full: retry after Retry-After seconds", _RETRY_AFTER),
    503: ("A dependency is down (Redis) or the engine is stopping / failed a step", {}),
}


def errors(*codes: int) -> Responses:
    """OpenAPI ``responses`` entries for ``codes``, each with the error body."""
    out: Responses = {}
    for code in codes:
        description, headers = _ERRORS[code]
        entry: dict[str, Any] = {"model": ErrorBody, "description": description}
        if headers:
            entry["headers"] = headers
        out[code] = entry
    return out


# every route behind a bearer key: bad key, wrong kind of key, Redis down (the key lookup)
AUTHENTICATED = errors(401, 403, 503)


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` substituted in (for schemas written into
    a response by hand, where ``#/$defs/...`` would not resolve)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


def event_stream(model: type[BaseModel], chunk: type[BaseModel], description: str
                 ) -> Responses:
    """The 200 of an inference route: ``model`` as JSON, or with ``stream: true`` server-sent
    events whose data is a ``chunk``, an error (a failure after the first byte), or the
    final ``[DONE]``. (OpenAPI 3.1 has no ``itemSchema``: an event stream's ``schema``
    describes one event, as OpenAPI 3.2 readers and Schemathesis take it.)"""
    data = {"anyOf": [
        {"const": "[DONE]"},
        {"type": "string", "not": {"const": "[DONE]"}, "contentMediaType": "application/json",
         "contentSchema": {"anyOf": [inline_schema(chunk), inline_schema(ErrorBody)]}}]}
    event = {"type": "object", "required": ["data"], "description": (
        "with stream: true: one event per generated piece, then 'data: [DONE]'"),
        "properties": {"data": data, "event": {"type": "string"},
                       "id": {"type": "string"}, "retry": {"type": "integer"}}}
    return {200: {"model": model, "description": description,
                  "content": {"text/event-stream": {"schema": event}}}}


def _binary(description: str) -> dict[str, Any]:
    return {"type": "string", "format": "binary", "description": description}


def multipart(*alternatives: dict[str, str], description: str) -> dict[str, Any]:
    """``openapi_extra`` declaring a required multipart body: one of ``alternatives``, each
    ``{part name: description}`` with every part required and no other part allowed."""
    schemas = [{"type": "object", "properties": {name: _binary(text)
                                                 for name, text in parts.items()},
                "required": list(parts), "additionalProperties": False}
               for parts in alternatives]
    schema = schemas[0] if len(schemas) == 1 else {"oneOf": schemas}
    return {"requestBody": {"required": True, "description": description,
                            "content": {"multipart/form-data": {"schema": schema}}}}


# --- configured limits ------------------------------------------------------------------
def document_limits(app: FastAPI, engine: EngineSettings) -> None:
    """Write the engine's configured limits into ``app``'s OpenAPI document: the request
    models carry static ceilings only (``tessera.server.schemas.MAX_TOKENS_CAP`` and the stop
    caps, enforced with 422), the engine enforces ``max_tokens_limit``,
    ``max_stop_sequences`` and ``max_stop_length`` (400); the schema then states the
    tighter of the two. Idempotent; call it once where the app is built."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        for component in schema.get("components", {}).get("schemas", {}).values():
            properties = component.get("properties", {})
            if "max_tokens" in properties:
                _cap(properties["max_tokens"], "integer", "maximum", engine.max_tokens_limit)
            if "stop" in properties:
                _cap_stop(properties["stop"], engine)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _variants(schema: dict[str, Any]) -> list[dict[str, Any]]:
    variants: list[dict[str, Any]] = schema.get("anyOf", [schema])
    return variants


def _cap(schema: dict[str, Any], type_: str, keyword: str, limit: int) -> None:
    for variant in _variants(schema):
        if variant.get("type") == type_:
            variant[keyword] = min(variant.get(keyword, limit), limit)


def _cap_stop(schema: dict[str, Any], engine: EngineSettings) -> None:
    if engine.max_stop_sequences == 0 and "anyOf" in schema:  # not even one string
        schema["anyOf"] = [v for v in schema["anyOf"] if v.get("type") != "string"]
    _cap(schema, "string", "maxLength", engine.max_stop_length)
    _cap(schema, "array", "maxItems", engine.max_stop_sequences)
    for variant in _variants(schema):
        if variant.get("type") == "array" and isinstance(variant.get("items"), dict):
            _cap(variant["items"], "string", "maxLength", engine.max_stop_length)
