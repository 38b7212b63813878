"""tessera.server.logs: JSON and text lines carry every ``extra=`` field and the exception; lines
logged while serving a request over real HTTP (the real app under uvicorn, a real
redis-server, the built-in model) carry that request's fields."""

from __future__ import annotations

import contextvars
import io
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from torch import nn

from tessera.adapters import artifact
from tessera.engine.errors import EngineStoppedError
from tessera.server.logs import (
    UVICORN_LOGGERS,
    bind_request,
    configure_logging,
    json_format_of,
    make_handler,
)
from tessera.store.embedded import EmbeddedRedis
from tests.factories import FACTORIES
from tests.http.conftest import Api, server_settings
from tests.live import LiveServer
from tests.store.conftest import redis_server  # noqa: F401  (fixture)

N = 4


# --- formatting ----------------------------------------------------------------------------
@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    """A logger of its own (nothing propagates to the root) for one test."""
    log = logging.getLogger(f"tests.logs.{uuid.uuid4().hex[:8]}")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield log
    log.handlers.clear()


def emit(log: logging.Logger, json_format: bool, fn: Any) -> str:
    buf = io.StringIO()
    handler = make_handler(json_format=json_format, stream=buf)
    log.addHandler(handler)
    try:
        fn(log)
    finally:
        log.removeHandler(handler)
    return buf.getvalue()


def slot_write_failed(log: logging.Logger) -> None:
    log.warning("slot write failed", extra={"adapter": "acme/a@1:ab", "slot": 3,
                                            "error": "out of memory", "dims": [4, 8]})


def test_extra_fields_in_json(logger: logging.Logger) -> None:
    out = emit(logger, True, slot_write_failed)
    [line] = out.splitlines()
    record = json.loads(line)
    assert record["message"] == "slot write failed"
    assert record["level"] == "WARNING" and record["logger"] == logger.name
    assert record["timestamp"].endswith("+00:00")  # ISO 8601, UTC
    assert {k: record[k] for k in ("adapter", "slot", "error", "dims")} == {
        "adapter": "acme/a@1:ab", "slot": 3, "error": "out of memory", "dims": [4, 8]}
    assert "exc_info" not in record and "color_message" not in record


def test_extra_fields_in_text(logger: logging.Logger) -> None:
    out = emit(logger, False, slot_write_failed)
    [line] = out.splitlines()
    assert f"WARNING {logger.name}: slot write failed " in line
    # after the message; a value with spaces is quoted
    assert line.endswith('adapter=acme/a@1:ab slot=3 error="out of memory" dims=[4, 8]')


def fail(log: logging.Logger) -> None:
    try:
        raise ZeroDivisionError("nothing to divide")
    except ZeroDivisionError:
        log.exception("step failed", extra={"step": 7})


def test_exception_info(logger: logging.Logger) -> None:
    record = json.loads(emit(logger, True, fail))  # one JSON line, traceback inside
    assert record["level"] == "ERROR" and record["step"] == 7
    assert record["exc_info"].startswith("Traceback (most recent call last):")
    assert "ZeroDivisionError: nothing to divide" in record["exc_info"]
    text = emit(logger, False, fail).splitlines()
    assert text[0].endswith("step failed step=7")
    assert text[-1] == "ZeroDivisionError: nothing to divide"


def test_request_context_never_overrides_explicit_fields(logger: logging.Logger) -> None:
    def in_request(log: logging.Logger) -> None:
        bind_request(request_id="gen-1", tenant="acme", adapter=None)
        bind_request(method="lora")
        log.info("inside", extra={"tenant": "explicit"})

    def run(log: logging.Logger) -> None:
        contextvars.copy_context().run(in_request, log)  # a request's own context
        log.info("outside")

    inside, outside = (json.loads(line) for line in emit(logger, True, run).splitlines())
    assert inside["request_id"] == "gen-1" and inside["method"] == "lora"
    assert inside["tenant"] == "explicit"  # the call's own extra= wins
    assert "adapter" not in inside  # None values are not bound
    assert "request_id" not in outside


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_choice() -> None:
    assert "JsonFormatter" in type(make_handler(stream=io.StringIO()).formatter).__name__
    assert type(make_handler(stream=Terminal()).formatter).__name__ == "TextFormatter"
    assert [json_format_of(v) for v in ("auto", "JSON", "text")] == [None, True, False]
    with pytest.raises(ValueError, match="log format"):
        json_format_of("xml")


# --- over real HTTP ------------------------------------------------------------------------
@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """``configure_logging`` (JSON, into a buffer, uvicorn's access lines on) for one test;
    then the logging as it was."""
    root = logging.getLogger()
    saved_root = root.handlers[:], root.level
    saved = {name: (lg.handlers[:], lg.propagate, lg.level)
             for name in UVICORN_LOGGERS for lg in [logging.getLogger(name)]}
    buf = io.StringIO()
    configure_logging("info", json_format=True, stream=buf)
    logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    try:
        yield buf
    finally:
        root.handlers[:] = saved_root[0]
        root.setLevel(saved_root[1])
        for name, (handlers, propagate, level) in saved.items():
            lg = logging.getLogger(name)
            lg.handlers[:], lg.propagate = handlers, propagate
            lg.setLevel(level)


def records(buf: io.StringIO, **match: Any) -> list[dict[str, Any]]:
    """The JSON lines logged so far whose fields include ``match``."""
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    return [r for r in lines if all(r.get(k) == v for k, v in match.items())]


@pytest.fixture(scope="module")
def live(redis_server: EmbeddedRedis, builtin_dir: Path) -> Iterator[LiveServer]:  # noqa: F811
    with LiveServer(server_settings(redis_server, builtin_dir)) as server:
        yield server


@pytest.fixture
async def api(live: LiveServer) -> AsyncIterator[Api]:
    async with httpx.AsyncClient(base_url=live.url, timeout=120) as client:
        yield Api(client)


async def lora_task(api: Api, ref_base: nn.Module) -> tuple[str, dict[str, str]]:
    name, headers = await api.tenant()
    adapter = FACTORIES["lora"](ref_base, torch.Generator().manual_seed(7))
    r = await api.upload_tessera(headers, "ad", *artifact.dumps(adapter))
    assert r.status_code == 201, r.text
    await api.activate(headers, "summarise", "ad")
    return name, headers


async def test_request_lines_carry_the_request_fields(api: Api, ref_base: nn.Module,
                                                      captured: io.StringIO) -> None:
    tenant, headers = await lora_task(api, ref_base)
    body = {"prompt": "hello world", "max_tokens": N, "temperature": 0, "ignore_eos": True}
    r = await api.client.post("/v1/tasks/summarise/generate", headers=headers, json=body)
    assert r.status_code == 200, r.text
    rid = r.json()["id"]

    [done] = records(captured, request_id=rid, message="request finished")
    assert done["level"] == "INFO" and done["logger"] == "tessera.server.api.infer"
    assert done["tenant"] == tenant and done["model"] == "summarise"
    assert done["method"] == "lora" and done["adapter"].startswith(f"{tenant}/ad@1:")
    assert done["outcome"] == "length" and done["completion_tokens"] == N
    assert done["prompt_tokens"] > 0 and done["latency_s"] >= done["first_token_s"] > 0
    assert "engine_request_id" not in done  # one id: the response's, also the engine's
    # uvicorn's access line, logged after the route returned, in the request's context
    [access] = records(captured, request_id=rid, logger="uvicorn.access")
    assert access["status_code"] == 200 and access["http_method"] == "POST"
    assert access["path"] == "/v1/tasks/summarise/generate"
    assert {k: access[k] for k in ("tenant", "adapter", "method")} == {
        k: done[k] for k in ("tenant", "adapter", "method")}
    # the next request on the same connection (a task of its own) carries none of them
    assert (await api.client.get("/v1/models", headers=headers)).status_code == 200
    [listing] = records(captured, logger="uvicorn.access", path="/v1/models")
    assert "request_id" not in listing and "tenant" not in listing

    # a stream ends in another task: its line carries the fields all the same
    async with api.client.stream("POST", "/v1/completions", headers=headers,
                                 json={**body, "model": "summarise", "stream": True}) as s:
        chunks = [line async for line in s.aiter_lines() if line.startswith("data: {")]
    sid = json.loads(chunks[0][len("data: "):])["id"]
    [streamed] = records(captured, request_id=sid, message="request finished")
    assert streamed["tenant"] == tenant and streamed["adapter"] == done["adapter"]
    assert streamed["outcome"] == "length" and streamed["completion_tokens"] == N


async def test_failed_request_logs_the_error_with_the_request_fields(
        api: Api, live: LiveServer, captured: io.StringIO,
        monkeypatch: pytest.MonkeyPatch) -> None:
    tenant, headers = await api.tenant()

    async def stopped(*args: Any, **kwargs: Any) -> None:
        raise EngineStoppedError("the engine is shutting down")

    monkeypatch.setattr(live.app.state.service, "submit", stopped)
    r = await api.client.post("/v1/tasks/base/generate", headers=headers,
                              json={"prompt": "hi", "max_tokens": N})
    assert r.status_code == 503, r.text

    # the exception handler's line (after the route raised) carries the request's fields
    [failed] = records(captured, tenant=tenant, message="request failed")
    assert failed["level"] == "ERROR" and failed["error"] == "EngineStoppedError"
    assert failed["request_id"].startswith("gen-") and failed["model"] == "base"
    assert "EngineStoppedError: the engine is shutting down" in failed["exc_info"]
    [done] = records(captured, request_id=failed["request_id"], message="request finished")
    assert done["outcome"] == "error" and done["adapter"] is None
