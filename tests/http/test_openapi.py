"""The OpenAPI document says what the server enforces: strict JSON types, the name rule on
every name (path or body, 400 ``invalid_name``), non-empty prompts and messages, "exactly
one of", bounded sampling fields, and every error status it answers, with the one error
body. Each rule is checked both ways: in ``/openapi.json`` and over real HTTP."""

from __future__ import annotations

from typing import Any

import httpx
import jsonschema_rs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.server.api.openapi import ErrorBody, document_limits
from tessera.server.app import create_app
from tessera.server.schemas import MAX_TOKENS_CAP, NAME_PATTERN, NAME_SCHEMA
from tessera.store.errors import InvalidNameError
from tessera.store.names import MAX_NAME_LENGTH, check_name
from tests.http.conftest import Api, admin
from tests.http.test_errors import error
from tests.live import HermeticServerSettings, HermeticSettings, LiveServer

GENERATE = "/v1/tasks/base/generate"


@pytest.fixture(scope="module")
def openapi(live: LiveServer) -> dict[str, Any]:
    document: dict[str, Any] = httpx.get(f"{live.url}/openapi.json").json()
    return document


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method.upper(), path, op) for path, item in document["paths"].items()
            for method, op in item.items()]


def component(document: dict[str, Any], name: str) -> dict[str, Any]:
    schema: dict[str, Any] = document["components"]["schemas"][name]
    return schema


# --- the document -----------------------------------------------------------------------
def test_every_error_status_is_declared_with_the_error_body(openapi: dict[str, Any]) -> None:
    public = {"/healthz", "/readyz"}
    for method, path, op in operations(openapi):
        responses = op["responses"]
        for status, response in responses.items():
            if int(status) >= 400:
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path)
        if path not in public:
            assert {"401", "403", "503"} <= set(responses), (method, path)
            assert "WWW-Authenticate" in responses["401"]["headers"]
        if "parameters" in op or "requestBody" in op:
            assert {"400", "422"} <= set(responses), (method, path)
    assert "HTTPValidationError" not in openapi["components"]["schemas"]
    assert set(component(openapi, "ErrorDetail")["required"]) == {"type", "message", "param",
                                                                  "code"}


def test_inference_declares_queue_full_and_event_streams(openapi: dict[str, Any]) -> None:
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/tasks/{task}/generate"):
        responses = openapi["paths"][path]["post"]["responses"]
        assert {"400", "404", "413", "422", "429"} <= set(responses)
        assert responses["429"]["headers"]["Retry-After"]["required"] is True
        content = responses["200"]["content"]
        assert "application/json" in content
        event = content["text/event-stream"]["schema"]
        assert event["required"] == ["data"]
        assert {"const": "[DONE]"} in event["properties"]["data"]["anyOf"]


def test_uploads_declare_multipart_bodies_and_limits(openapi: dict[str, Any]) -> None:
    def parts(path: str) -> list[tuple[set[str], set[str]]]:
        op = openapi["paths"][path]["post"]
        assert {"400", "413", "415", "422"} <= set(op["responses"])
        body = op["requestBody"]
        assert body["required"] is True
        schema = body["content"]["multipart/form-data"]["schema"]
        return [(set(s["properties"]), set(s["required"]))
                for s in schema.get("oneOf", [schema])]

    assert parts("/v1/adapters/{name}") == [({"archive"}, {"archive"}),
                                            ({"config", "weights"}, {"config", "weights"})]
    assert parts("/v1/hypernetworks/{name}") == [({"manifest", "weights"},
                                                  {"manifest", "weights"})]
    assert parts("/v1/hypernetworks/{name}/versions/{version}/tasks/{task}") == [
        ({"embedding"}, {"embedding"})]


def test_names_carry_the_name_rule(openapi: dict[str, Any]) -> None:
    seen = 0
    for method, path, op in operations(openapi):
        for parameter in op.get("parameters", []):
            if parameter["name"] in ("name", "task", "tenant"):
                seen += 1
                assert parameter["schema"]["pattern"] == NAME_PATTERN, (method, path)
                assert parameter["schema"]["maxLength"] == MAX_NAME_LENGTH
            if parameter["name"] == "version":
                assert parameter["schema"]["minimum"] == 1
    assert seen >= 15
    assert component(openapi, "TenantCreate")["properties"]["name"]["pattern"] == NAME_PATTERN
    activate = component(openapi, "Activate")["properties"]
    for field in ("adapter", "hypernetwork", "hyper_task"):
        assert activate[field]["pattern"] == NAME_PATTERN
        assert "anyOf" not in activate[field]  # a string, never null


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(alphabet="ab1._-/:\x00\n é", max_size=70),
                 st.from_regex(NAME_PATTERN, fullmatch=True),
                 st.text(min_size=60, max_size=70, alphabet="xy.")))
def test_name_pattern_is_check_name(name: str) -> None:
    """The schema's pattern (ECMA semantics, as clients and fuzzers read it) accepts
    exactly what tessera.store.names.check_name accepts."""
    try:
        check_name(name)
        allowed = True
    except InvalidNameError:
        allowed = False
    assert VALIDATOR.is_valid(name) == allowed, name


VALIDATOR = jsonschema_rs.validator_for({"type": "string", **NAME_SCHEMA})


def test_exactly_one_target_and_one_input(openapi: dict[str, Any]) -> None:
    activate = component(openapi, "Activate")
    assert [branch["required"] for branch in activate["oneOf"]] == [
        ["adapter"], ["hypernetwork", "hyper_task"]]
    generate = component(openapi, "GenerateIn")
    assert [branch["required"] for branch in generate["oneOf"]] == [["prompt"],
                                                                   ["messages"]]
    validator = jsonschema_rs.validator_for({**activate, "components": openapi["components"]})
    assert validator.is_valid({"adapter": "a", "version": 1})
    assert validator.is_valid({"hypernetwork": "h", "hyper_task": "t", "version": 1})
    for bad in ({"version": 1}, {"adapter": "a", "hypernetwork": "h", "version": 1},
                {"adapter": "a", "hyper_task": "t", "version": 1},
                {"hypernetwork": "h", "version": 1}, {"adapter": None, "version": 1}):
        assert not validator.is_valid(bad), bad


def test_sampling_bounds_and_strict_types(openapi: dict[str, Any]) -> None:
    for name in ("GenerateIn", "CompletionIn", "ChatIn"):
        props = component(openapi, name)["properties"]
        assert props["max_tokens"]["anyOf"][0]["maximum"] <= MAX_TOKENS_CAP
        assert props["temperature"]["minimum"] == 0 and props["temperature"]["maximum"] == 100
        assert props["top_p"]["exclusiveMinimum"] == 0 and props["top_p"]["maximum"] == 1
        assert props["ignore_eos"]["type"] == "boolean"
        stop = {v.get("type"): v for v in props["stop"]["anyOf"]}
        assert stop["string"]["minLength"] == 1
        assert stop["array"]["maxItems"] >= 1 and stop["array"]["items"]["minLength"] == 1
    prompt = component(openapi, "CompletionIn")["properties"]["prompt"]["oneOf"]
    assert prompt == [
        {**prompt[0], "type": "string", "minLength": 1},
        {**prompt[1], "type": "array", "minItems": 1,
         "items": {"type": "integer", "minimum": 0}},
        {**prompt[2], "type": "array", "minItems": 1, "maxItems": 128,
         "items": {**prompt[2]["items"], "type": "string", "minLength": 1}}]
    messages = component(openapi, "ChatIn")["properties"]["messages"]
    assert messages["minItems"] == 1


def test_configured_limits_are_documented() -> None:
    engine = HermeticSettings(device="cpu", max_tokens_limit=100, default_max_tokens=50,
                              max_stop_sequences=3, max_stop_length=16)
    app = create_app(HermeticServerSettings(engine=engine))
    document_limits(app, engine)
    document_limits(app, engine)  # idempotent
    for name in ("GenerateIn", "CompletionIn", "ChatIn"):
        props = app.openapi()["components"]["schemas"][name]["properties"]
        assert props["max_tokens"]["anyOf"][0]["maximum"] == 100
        stop = {v.get("type"): v for v in props["stop"]["anyOf"]}
        assert stop["string"]["maxLength"] == 16
        assert stop["array"]["maxItems"] == 3 and stop["array"]["items"]["maxLength"] == 16


# --- what the server answers ------------------------------------------------------------
async def test_json_types_are_not_coerced(api: Api) -> None:
    _, headers = await api.tenant()

    async def post(path: str, body: dict[str, Any]) -> httpx.Response:
        return await api.client.post(path, headers=headers, json=body)

    for body, field in (({"prompt": [False]}, "prompt.0"),
                        ({"prompt": [1, True]}, "prompt.1"),
                        ({"prompt": "hi", "ignore_eos": 0}, "ignore_eos"),
                        ({"prompt": "hi", "stream": "true"}, "stream"),
                        ({"prompt": "hi", "max_tokens": "2"}, "max_tokens"),
                        ({"prompt": "hi", "max_tokens": 2.5}, "max_tokens"),
                        ({"prompt": "hi", "temperature": "0"}, "temperature"),
                        ({"prompt": "hi", "seed": True}, "seed")):
        err = error(await post(GENERATE, body), 422)
        assert err["type"] == "invalid_request" and err["field"] == field, (body, err)
    err = error(await post("/v1/completions", {"model": "base", "prompt": [False]}), 400,
                "integer")  # 400 on the OpenAI routes
    assert err["field"] == "prompt.0"
    ErrorBody.model_validate((await post(GENERATE, {"prompt": [False]})).json())
    # an integral float is an integer (JSON Schema's reading); OpenAI's extra fields pass
    r = await post(GENERATE, {"prompt": [104, 105], "max_tokens": 2.0, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["completion_tokens"] == 2
    r = await post("/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": 1,
                                       "logit_bias": {}, "n": 1})
    assert r.status_code == 200, r.text


async def test_inputs_must_not_be_empty_and_exactly_one(api: Api) -> None:
    _, headers = await api.tenant()
    chat = [{"role": "user", "content": "hi"}]
    cases: list[tuple[str, dict[str, Any]]] = [
        (GENERATE, {"prompt": ""}), (GENERATE, {"prompt": []}), (GENERATE, {"messages": []}),
        (GENERATE, {}), (GENERATE, {"prompt": "hi", "messages": chat}),
        (GENERATE, {"prompt": None, "messages": chat}),
        ("/v1/completions", {"model": "base", "prompt": ""}),
        ("/v1/completions", {"model": "base", "prompt": []}),
        ("/v1/chat/completions", {"model": "base", "messages": []}),
        (GENERATE, {"prompt": "hi", "stop": [""]}),
        (GENERATE, {"prompt": "hi", "stop": ["x"] * 65}),
        (GENERATE, {"prompt": "hi", "max_tokens": MAX_TOKENS_CAP + 1}),
        (GENERATE, {"prompt": "hi", "max_tokens": 0}),
        (GENERATE, {"prompt": "hi", "top_p": 0}),
        (GENERATE, {"prompt": "hi", "temperature": 101}),
    ]
    for path, body in cases:  # 400 on the OpenAI routes, as OpenAI answers
        error(await api.client.post(path, headers=headers, json=body),
              422 if path == GENERATE else 400)
    # within the schema's ceilings, over the engine's configured limits: 400 naming them
    err = error(await api.client.post(GENERATE, headers=headers,
                                      json={"prompt": "hi", "max_tokens": 2,
                                            "stop": ["x"] * 9}), 400, "8")
    assert err["type"] == "invalid_request"


async def test_names_answer_400_invalid_name(api: Api) -> None:
    _, headers = await api.tenant()
    for name, word in (("t" * 70, "limit"), ("a..b", "not allowed"), ("-x", "not allowed")):
        r = await api.client.post("/v1/tenants", headers=admin(), json={"name": name})
        err = error(r, 400, word)
        assert err["type"] == "invalid_name" and err["field"] == "name"
    for path, word in (("/v1/adapters/..x", "not allowed"), ("/v1/adapters/a..b", "not allowed"),
                       ("/v1/adapters/" + "a" * 65, "limit"), ("/v1/tasks/a..b", "not allowed"),
                       ("/v1/hypernetworks/-h/versions/1", "not allowed")):
        err = error(await api.client.get(path, headers=headers), 400, word)
        assert err["type"] == "invalid_name", (path, err)
    r = await api.client.post("/v1/tasks/..t/activate", headers=headers,
                              json={"adapter": "a", "version": 1})
    assert error(r, 400)["field"] == "task"
    r = await api.client.post("/v1/tasks/t/activate", headers=headers,
                              json={"adapter": "a..b", "version": 1})
    err = error(r, 400, "not allowed")
    assert err["type"] == "invalid_name" and err["field"] == "adapter"
    r = await api.client.post("/v1/admin/tenants/a..b/tasks/t/pin", headers=admin())
    assert error(r, 400)["type"] == "invalid_name"
    # other bad path parameters are 400 too (declared), naming the parameter
    for path in ("/v1/adapters/a/versions/0", "/v1/adapters/a/versions/x"):
        err = error(await api.client.delete(path, headers=headers), 400)
        assert err["type"] == "invalid_request" and err["field"] == "version"


async def test_activate_needs_exactly_one_target(api: Api) -> None:
    _, headers = await api.tenant()
    for body in ({"version": 1}, {"adapter": "a", "hypernetwork": "h", "hyper_task": "t",
                                  "version": 1},
                 {"adapter": "a", "hyper_task": "t", "version": 1},
                 {"adapter": "a", "hypernetwork": None, "version": 1},
                 {"adapter": "a", "version": "1"}, {"adapter": "a", "version": 0}):
        error(await api.client.post("/v1/tasks/t/activate", headers=headers, json=body), 422)
