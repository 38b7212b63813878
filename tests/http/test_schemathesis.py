"""Schemathesis against the live server, as its CLI runs (examples, coverage and fuzzing
phases; schema-valid and schema-violating requests) over every operation of
``/openapi.json``, with a tenant key (and the admin key on admin operations) injected.

Every response must not be a server error and must conform to the schema (status code
declared, content type, headers, body), and every schema-violating request must be
refused. Schema-valid requests are not required to succeed: a random archive is no
adapter, a random name is unknown (400/404/422 say so, and are declared).

Bounded: ``EXAMPLES`` per operation and phase, on a server that generates at most
``MAX_TOKENS`` tokens per request; schema-valid inference requests are pointed at the base
model or a bound task (not at random unknown names), so the sampler and stop handling see
every sampling value the schema admits."""

from __future__ import annotations

import json
import logging
import os
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis.engine import events, from_schema
from schemathesis.generation import GenerationMode
from torch import nn

from tessera.adapters.safeio import write_safetensors
from tessera.store.embedded import EmbeddedRedis
from tests.http.conftest import ADMIN_KEY, server_settings
from tests.http.test_errors import lora_files
from tests.live import LiveServer

# per operation and phase; TESSERA_SCHEMATHESIS_EXAMPLES=500 for a deeper run by hand
EXAMPLES = int(os.environ.get("TESSERA_SCHEMATHESIS_EXAMPLES", "60"))
MAX_TOKENS = 8
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_headers_conformance", "response_schema_conformance",
          "negative_data_rejection")
ADMIN_PATHS = "^/v1/(tenants|admin/)"
TENANT, ADAPTER, TASK = "fuzz", "fuzz-adapter", "fuzz-task"
MODELS = ("base", TASK)  # what schema-valid inference requests name
INFERENCE = {"/v1/completions", "/v1/chat/completions", "/v1/tasks/{task}/generate"}
log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def server(redis_server: EmbeddedRedis, builtin_dir: Path,
           ref_base: nn.Module) -> Iterator[tuple[str, str]]:
    """``(url, tenant key)``: a tenant with one adapter bound to a task."""
    limits = {"max_tokens_limit": MAX_TOKENS, "default_max_tokens": MAX_TOKENS,
              "context_limit": 64}
    settings = server_settings(redis_server, builtin_dir, **limits)
    with LiveServer(settings) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        r = client.post("/v1/tenants", json={"name": TENANT},
                        headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert r.status_code == 201, r.text
        tenant = {"Authorization": f"Bearer {r.json()['api_key']}"}
        manifest, tensors = lora_files(ref_base)
        r = client.post(f"/v1/adapters/{ADAPTER}", headers=tenant, files={
            "config": ("m.json", json.dumps(manifest).encode()),
            "weights": ("w.safetensors", write_safetensors(tensors))})
        assert r.status_code == 201, r.text
        r = client.post(f"/v1/tasks/{TASK}/activate", headers=tenant,
                        json={"adapter": ADAPTER, "version": 1})
        assert r.status_code == 200, r.text
        yield live.url, tenant["Authorization"]


def _config(tenant_auth: str) -> schemathesis.Config:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    return schemathesis.Config.from_dict({
        "seed": 20240611,
        "generation": {"max-examples": EXAMPLES, "database": "none"},
        "phases": {"stateful": {"enabled": False}},
        "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
        "request-timeout": 60,
        "operations": [
            {"include-path-regex": ADMIN_PATHS, "headers": admin},
            {"exclude-path-regex": ADMIN_PATHS, "headers": {"Authorization": tenant_auth}},
        ],
    })


def _known_model(context: Any, case: Any) -> Any:
    """A schema-valid inference request names the base model or the bound task."""
    meta = case.meta
    if (case.operation.path in INFERENCE and meta is not None
            and meta.generation.mode == GenerationMode.POSITIVE):
        model = MODELS[zlib.crc32(repr(case.body).encode()) % len(MODELS)]
        if isinstance(case.body, dict) and "model" in case.body:
            case.body = {**case.body, "model": model}
        if "task" in (case.path_parameters or {}):
            case.path_parameters = {**case.path_parameters, "task": model}
    return case


def _describe(check: str, label: str, title: str, message: str, interaction: Any) -> str:
    request, response = interaction.request, interaction.response
    body = request.body.decode(errors="replace") if isinstance(request.body, bytes) else ""
    answer = "no response" if response is None else (
        f"{response.status_code} {response.content[:400]!r}")
    return (f"{check} | {label} | {title}\n  {message[:400]}\n"
            f"  request: {request.method} {request.uri} {body[:400]}\n  response: {answer}")


def test_schemathesis(server: tuple[str, str]) -> None:
    url, tenant_auth = server
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=_config(tenant_auth))
    schema.hook("map_case")(_known_model)
    failures: dict[tuple[str, str, str], str] = {}
    statuses: dict[int, int] = {}
    problems: list[str] = []
    start = time.monotonic()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            for interaction in recorder.interactions.values():
                if interaction.response is not None:
                    code = interaction.response.status_code
                    statuses[code] = statuses.get(code, 0) + 1
            for case_id, checks in recorder.checks.items():
                for check in checks:
                    info = check.failure_info
                    if info is None:
                        continue
                    key = (check.name, recorder.label, info.failure.title)
                    failures.setdefault(key, _describe(
                        *key, info.failure.message, recorder.interactions[case_id]))
        elif isinstance(event, events.NonFatalError | events.FatalError):
            problems.append(repr(event))
    elapsed = time.monotonic() - start
    summary = (f"{sum(statuses.values())} responses in {elapsed:.0f}s, by status: "
               f"{dict(sorted(statuses.items()))}")
    log.info("schemathesis: %s", summary)
    assert not problems, "\n".join(problems)
    assert not failures, f"{len(failures)} distinct failures ({summary}):\n" + "\n".join(
        failures.values())
    # the run exercised the server: successes, refusals of bad input and unknown names
    assert {200, 201, 400, 404, 422} <= set(statuses), summary
