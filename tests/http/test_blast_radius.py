"""One tenant never hurts another: while tenant B runs 4 streams, tenant A sends every
poison input of the hardening issue (hostile sampling values, a non-finite adapter config,
an adapter whose output overflows, huge bodies and prompts, an archive bomb, nested JSON,
clients that leave). B's streams all complete, token for token equal to a run without the
poison and to the independent reference."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from torch import nn

from tessera.adapters import Adapter, Component, artifact
from tessera.store.embedded import EmbeddedRedis
from tests.engine.conftest import Reference
from tests.factories import FACTORIES
from tests.http.conftest import Api, LiveServer, server_settings
from tests.http.test_inference import make_peft_folder
from tests.server.test_uploads import GIB, gzip_then_zeros, tar_member

B_PROMPTS = ("hello world", "The quick brown fox", "x = 1\ny = 2", "héllo 世界")
B_TOKENS = 40
CONTEXT = 2048


@pytest.fixture(scope="module")
def shared(redis_server: EmbeddedRedis, builtin_dir: Path) -> Iterator[LiveServer]:
    with LiveServer(server_settings(redis_server, builtin_dir, context_limit=CONTEXT)) as s:
        yield s


async def b_stream(client: httpx.AsyncClient, headers: dict[str, str], prompt: str
                   ) -> list[int]:
    """One of B's streams: its token ids; it must end with a finish reason and [DONE]."""
    ids: list[int] = []
    events: list[str] = []
    async with client.stream("POST", "/v1/tasks/base/generate", headers=headers, json={
            "prompt": prompt, "max_tokens": B_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                await asyncio.sleep(0)  # a slow-ish reader: streams overlap the poison
    assert events[-1] == "[DONE]", events[-3:]
    for event in events[:-1]:
        body = json.loads(event)
        assert "error" not in body, body
        if body["token_id"] is not None:
            ids.append(body["token_id"])
    assert json.loads(events[-2])["finish_reason"] == "length"
    return ids


def overflowing(adapter: Adapter) -> Adapter:
    """Finite weights (valid) so large that the adapter's output overflows to inf."""
    lora = adapter.components[0]
    modules = {path: {name: torch.full_like(t, 1e19) for name, t in tensors.items()}
               for path, tensors in lora.modules.items()}
    return Adapter((Component("lora", lora.config, modules),))


Poison = Callable[[], Awaitable[Any]]


def poisons(client: httpx.AsyncClient, api: Api, headers: dict[str, str],
            ref_base: nn.Module, tmp: Path) -> dict[str, Poison]:
    def post(path: str, **kwargs: Any) -> Poison:
        return lambda: client.post(path, headers={**headers, **kwargs.pop("headers", {})},
                                   **kwargs)

    def completion(**body: Any) -> Poison:
        return post("/v1/completions", json={"model": "base", "prompt": "x",
                                             "max_tokens": 4, **body})

    peft = make_peft_folder(ref_base, tmp)
    config = json.loads((peft / "adapter_config.json").read_text())
    weights = (peft / "adapter_model.safetensors").read_bytes()

    def peft_upload(name: str, alpha: float) -> Poison:
        text = json.dumps({**config, "lora_alpha": alpha})  # json writes Infinity
        return post(f"/v1/adapters/{name}", files={
            "config": ("adapter_config.json", text.encode()),
            "weights": ("adapter_model.safetensors", weights)})

    archive = b"".join(tar_member(f"a/{n}", (peft / n).read_bytes())
                       for n in ("adapter_config.json", "adapter_model.safetensors"))
    bomb = gzip_then_zeros(archive + tar_member("a/zeros.bin", size=20 * GIB), 16)

    async def overflow_adapter() -> Any:
        bad = overflowing(FACTORIES["lora"](ref_base, torch.Generator().manual_seed(9)))
        r = await api.upload_tessera(headers, "overflow", *artifact.dumps(bad))
        assert r.status_code == 201, r.text
        await api.activate(headers, "overflow-task", "overflow")
        return await client.post("/v1/completions", headers=headers, json={
            "model": "overflow-task", "prompt": "hello", "max_tokens": 8})

    async def leaves(body: dict[str, Any]) -> Any:
        try:
            await client.post("/v1/completions", headers=headers, timeout=0.3, json={
                "model": "base", "prompt": "bye", "max_tokens": 1500, "temperature": 0,
                "ignore_eos": True, **body})
        except httpx.TimeoutException:
            return "left"
        return "stayed"

    nested = "[" * 50_000 + "]" * 50_000
    return {
        "tiny temperature": completion(temperature=1e-40),
        "denormal top_p": completion(top_p=5e-324),
        "both, streamed": completion(temperature=1e-40, top_p=5e-324, stream=True),
        "alpha Infinity": peft_upload("inf-alpha", float("inf")),
        "alpha 1e38": peft_upload("big-alpha", 1e38),
        "overflowing adapter": overflow_adapter,
        "5 MiB prompt": completion(prompt="a" * (5 << 20)),
        "1.5 MiB prompt": completion(prompt="a" * (3 << 19)),
        "archive bomb": post("/v1/adapters/bomb", files={"archive": ("b.tar.gz", bomb)}),
        "nested JSON": post("/v1/completions", headers={"Content-Type": "application/json"},
                            content=f'{{"model": "base", "prompt": {nested}}}'),
        "bool prompt": completion(prompt=[False]),
        "huge max_tokens": completion(max_tokens=10**9),
        "leaves a non-streaming request": lambda: leaves({}),
        "leaves a stream": lambda: leaves({"stream": True}),
    }


async def test_one_tenants_poison_never_reaches_another(
        shared: LiveServer, reference: Reference, ref_base: nn.Module,
        tmp_path: Path) -> None:
    async with httpx.AsyncClient(base_url=shared.url, timeout=120) as client:
        api = Api(client)
        _, b = await api.tenant()
        _, a = await api.tenant()
        clean = await asyncio.gather(*(b_stream(client, b, p) for p in B_PROMPTS))
        for prompt, ids in zip(B_PROMPTS, clean, strict=True):
            assert ids == reference.greedy(None, prompt, B_TOKENS)

        attacks = poisons(client, api, a, ref_base, tmp_path)
        streams = [asyncio.ensure_future(b_stream(client, b, p)) for p in B_PROMPTS]
        outcomes = await asyncio.gather(*(attack() for attack in attacks.values()),
                                        return_exceptions=True)
        poisoned = await asyncio.gather(*streams)
        assert poisoned == clean

        answers = dict(zip(attacks, outcomes, strict=True))
        for name, answer in answers.items():
            assert not isinstance(answer, BaseException), (name, answer)
            if isinstance(answer, httpx.Response):
                assert answer.status_code < 500 or (
                    name == "overflowing adapter" and answer.status_code == 500
                    and answer.json()["error"]["type"] == "generation_failed"), (
                    name, answer.status_code, answer.text[:300])
        statuses = {n: r.status_code for n, r in answers.items()
                    if isinstance(r, httpx.Response)}
        assert statuses["tiny temperature"] == statuses["denormal top_p"] == 200
        assert statuses["alpha Infinity"] == statuses["alpha 1e38"] == 422
        assert statuses["5 MiB prompt"] == statuses["archive bomb"] == 413
        assert statuses["1.5 MiB prompt"] == 400
        assert answers["leaves a non-streaming request"] == "left"
        # and the server is whole: B's streams run as they did before
        again = await asyncio.gather(*(b_stream(client, b, p) for p in B_PROMPTS))
        assert again == clean
