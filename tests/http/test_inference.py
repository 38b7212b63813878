"""Inference over real HTTP and real Redis: every output equals the independent reference
(``tessera.adapters.reference_model`` + a plain greedy loop, no engine, no slot pool)."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from tessera.adapters import artifact
from tessera.adapters.peft_io import load_peft_dir
from tessera.adapters.reference import base_copy
from tests.engine.conftest import Reference
from tests.factories import FACTORIES
from tests.http.conftest import Api

N = 8


def archive(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(folder, arcname="my-adapter")
    return buf.getvalue()


def make_peft_folder(base: nn.Module, tmp: Path) -> Path:
    """A real PEFT LoRA saved by ``save_pretrained`` (lora_B randomised: not identity)."""
    model = get_peft_model(base_copy(base), LoraConfig(r=4, lora_alpha=8,
                                                       target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    model.save_pretrained(tmp / "peft")
    return tmp / "peft"


def expect(reference: Reference, adapter: Any, prompt: str, body: dict[str, Any]) -> None:
    """The response's tokens are the reference's greedy tokens (shorter only at EOS)."""
    want = reference.greedy(adapter, prompt, N)
    got = body["token_ids"]
    assert got == want, (prompt, got, want)


async def generate(api: Api, headers: dict[str, str], task: str, prompt: str,
                   **extra: Any) -> dict[str, Any]:
    r = await api.client.post(f"/v1/tasks/{task}/generate", headers=headers, json={
        "prompt": prompt, "max_tokens": N, "temperature": 0, "ignore_eos": True, **extra})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_health(api: Api) -> None:
    assert (await api.client.get("/healthz")).json() == {"status": "ok"}
    r = await api.client.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"


async def test_peft_archive_upload_activate_generate(api: Api, ref_base: nn.Module,
                                                     reference: Reference,
                                                     tmp_path: Path) -> None:
    _, headers = await api.tenant()
    folder = make_peft_folder(ref_base, tmp_path)
    r = await api.client.post("/v1/adapters/support", headers=headers,
                              files={"archive": ("support.tar.gz", archive(folder))})
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 1 and r.json()["format"] == "peft"
    await api.activate(headers, "support-task", "support", 1)
    adapter = load_peft_dir(folder)
    for prompt in ("hello world", "The quick brown fox"):
        expect(reference, adapter, prompt,
               await generate(api, headers, "support-task", prompt))
    # the base model answers under "base"
    base = await generate(api, headers, "base", "hello world")
    expect(reference, None, "hello world", base)
    assert base["token_ids"] != reference.greedy(adapter, "hello world", N)


async def test_concurrent_adapters_of_many_methods(api: Api, ref_base: nn.Module,
                                                   reference: Reference) -> None:
    _, headers = await api.tenant()
    gen = torch.Generator().manual_seed(3)
    methods = ("lora", "dora", "hra", "hut", "soka", "bottleneck")
    made = {m: FACTORIES[m](ref_base, gen) for m in methods}
    for method, adapter in made.items():
        manifest, weights = artifact.dumps(adapter)
        r = await api.upload_tessera(headers, f"a-{method}", manifest, weights)
        assert r.status_code == 201, r.text
        assert r.json()["method"] == method
        await api.activate(headers, f"task-{method}", f"a-{method}")
    prompts = ("hello world", "a", "Once upon a time")
    jobs = [(m, p) for m in (*methods, "base") for p in prompts]
    results = await asyncio.gather(*(
        generate(api, headers, f"task-{m}" if m != "base" else "base", p) for m, p in jobs))
    for (method, prompt), body in zip(jobs, results, strict=True):
        expect(reference, made.get(method), prompt, body)


async def _sse(api: Api, path: str, headers: dict[str, str],
               body: dict[str, Any]) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    async with api.client.stream("POST", path, headers=headers, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in r.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        assert line.startswith("data: ")
        events.append(json.loads(line[len("data: "):]))
    return events


async def test_openai_endpoints_and_streaming(api: Api, ref_base: nn.Module,
                                              reference: Reference) -> None:
    name, headers = await api.tenant()
    adapter = FACTORIES["lora"](ref_base, torch.Generator().manual_seed(5))
    manifest, weights = artifact.dumps(adapter)
    assert (await api.upload_tessera(headers, "ad", manifest, weights)).status_code == 201
    await api.activate(headers, "summarise", "ad")
    want = reference.text(reference.greedy(adapter, "hello world", N))
    common = {"model": "summarise", "prompt": "hello world", "max_tokens": N,
              "temperature": 0, "ignore_eos": True}
    r = await api.client.post("/v1/completions", headers=headers, json=common)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == want
    assert body["usage"]["completion_tokens"] == N
    events = await _sse(api, "/v1/completions", headers, {**common, "stream": True})
    assert "".join(e["choices"][0]["text"] for e in events) == want
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    native = await _sse(api, "/v1/tasks/summarise/generate", headers,
                        {k: v for k, v in common.items() if k != "model"} | {"stream": True})
    assert [e["token_id"] for e in native] == reference.greedy(adapter, "hello world", N)
    models = (await api.client.get("/v1/models", headers=headers)).json()
    assert {m["id"] for m in models["data"]} == {"base", "summarise"}
    assert name in {m["owned_by"] for m in models["data"]}


async def test_chat_completions_stream_equals_whole(api: Api) -> None:
    _, headers = await api.tenant()
    body = {"model": "base", "messages": [{"role": "user", "content": "hi there"}],
            "max_tokens": N, "temperature": 0, "ignore_eos": True}
    r = await api.client.post("/v1/chat/completions", headers=headers, json=body)
    assert r.status_code == 200, r.text
    whole = r.json()["choices"][0]["message"]["content"]
    events = await _sse(api, "/v1/chat/completions", headers, {**body, "stream": True})
    assert "".join(e["choices"][0]["delta"]["content"] for e in events) == whole


async def test_seeded_sampling_is_reproducible(api: Api) -> None:
    _, headers = await api.tenant()
    body = {"prompt": "hello", "max_tokens": N, "temperature": 0.9, "top_p": 0.9,
            "top_k": 20, "seed": 1234, "ignore_eos": True}
    first = await generate(api, headers, "base", **body)
    second = await generate(api, headers, "base", **body)
    assert first["token_ids"] == second["token_ids"]
    assert len(first["token_ids"]) == N
