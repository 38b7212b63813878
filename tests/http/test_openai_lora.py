"""vLLM's runtime LoRA endpoints over real HTTP and real Redis: ``/v1/load_lora_adapter``
uploads a PEFT folder from under the configured adapter root as the tenant's adapter and
binds the task of that name (its outputs equal the reference with that adapter),
``/v1/unload_lora_adapter`` unbinds it; ``../``, absolute paths and symlinks leaving the
root are refused alike whether their target exists or not, pickle weights are 415,
oversized or non-regular files are refused before they are read, and with no root
configured both endpoints answer 403."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from torch import nn

from tessera.adapters.peft_io import load_peft_dir
from tessera.store.embedded import EmbeddedRedis
from tests.engine.conftest import Reference
from tests.http.conftest import UPLOAD_LIMIT, Api, server_settings
from tests.http.test_inference import make_peft_folder
from tests.live import LiveServer

N = 6


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory, ref_base: nn.Module
         ) -> tuple[Path, Path]:
    """``(root, outside)``: the adapter root with a PEFT folder ``good``, and a folder
    beside the root holding a valid PEFT folder too (``outside/peft``)."""
    top = tmp_path_factory.mktemp("lora")
    root, outside = top / "root", top / "outside"
    root.mkdir()
    outside.mkdir()
    shutil.copytree(make_peft_folder(ref_base, top / "made"), root / "good")
    shutil.copytree(root / "good", outside / "peft")
    return root, outside


@pytest.fixture(scope="module")
def lora_live(redis_server: EmbeddedRedis, builtin_dir: Path,
              dirs: tuple[Path, Path]) -> Iterator[LiveServer]:
    settings = server_settings(redis_server, builtin_dir).model_copy(
        update={"lora_adapter_root": dirs[0]})
    with LiveServer(settings) as server:
        yield server


@pytest.fixture
async def lora_api(lora_live: LiveServer) -> Any:
    async with httpx.AsyncClient(base_url=lora_live.url, timeout=120) as client:
        yield Api(client)


async def load(api: Api, headers: dict[str, str], name: str, path: str | Path,
               **extra: Any) -> httpx.Response:
    return await api.client.post("/v1/load_lora_adapter", headers=headers, json={
        "lora_name": name, "lora_path": str(path), **extra})


async def complete(api: Api, headers: dict[str, str], model: str) -> httpx.Response:
    return await api.client.post("/v1/completions", headers=headers, json={
        "model": model, "prompt": "hello world", "max_tokens": N, "temperature": 0,
        "ignore_eos": True})


def refused(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert err["code"] == code, err
    return err


async def test_load_serve_reload_unload(lora_api: Api, dirs: tuple[Path, Path],
                                        reference: Reference) -> None:
    root, _ = dirs
    name, headers = await lora_api.tenant()
    r = await load(lora_api, headers, "support", root / "good")
    assert r.status_code == 200, r.text
    assert r.text == "Success: LoRA adapter 'support' added successfully."
    r = await complete(lora_api, headers, "support")
    assert r.status_code == 200, r.text
    want = reference.text(reference.greedy(load_peft_dir(root / "good"), "hello world", N))
    assert r.json()["choices"][0]["text"] == want
    models = (await lora_api.client.get("/v1/models", headers=headers)).json()["data"]
    [card] = [m for m in models if m["id"] == "support"]
    assert card["parent"] == "base" and card["owned_by"] == name
    # loaded already: 400 as vLLM, unless in place (a new version, bound at once)
    refused(await load(lora_api, headers, "support", "good"), 400, "already_loaded")
    r = await load(lora_api, headers, "support", "good", load_inplace=True)  # relative
    assert r.status_code == 200, r.text
    task = (await lora_api.client.get("/v1/tasks/support", headers=headers)).json()
    assert task["adapter"] == "support" and task["version"] == 2
    # another tenant sees none of it
    _, other = await lora_api.tenant()
    refused(await complete(lora_api, other, "support"), 404, "not_found")
    refused(await lora_api.client.post("/v1/unload_lora_adapter", headers=other,
                                       json={"lora_name": "support"}), 404, "not_found")
    # unload: the task is unbound, the versions stay
    r = await lora_api.client.post("/v1/unload_lora_adapter", headers=headers,
                                   json={"lora_name": "support"})
    assert r.status_code == 200 and "removed" in r.text
    refused(await complete(lora_api, headers, "support"), 404, "not_found")
    refused(await lora_api.client.post("/v1/unload_lora_adapter", headers=headers,
                                       json={"lora_name": "support"}), 404, "not_found")
    versions = (await lora_api.client.get("/v1/adapters/support", headers=headers)).json()
    assert [v["version"] for v in versions["versions"]] == [1, 2]
    assert (await load(lora_api, headers, "support", "good")).status_code == 200  # again


async def test_paths_outside_the_root_are_refused_alike(lora_api: Api,
                                                        dirs: tuple[Path, Path]) -> None:
    root, outside = dirs
    _, headers = await lora_api.tenant()
    (root / "escape").symlink_to(outside, target_is_directory=True)
    mixed = root / "mixed"
    mixed.mkdir()
    shutil.copy(root / "good" / "adapter_config.json", mixed)
    (mixed / "adapter_model.safetensors").symlink_to(outside / "peft" /
                                                     "adapter_model.safetensors")
    messages = []
    for path in ("../outside/peft", str(outside / "peft"), "good/../../outside/peft",
                 "../outside/no-such-folder", "/etc", "escape/peft", "escape/nothing",
                 "mixed", "../" * 40 + "etc"):
        err = refused(await load(lora_api, headers, "x", path), 400, "invalid_path")
        assert err["param"] == "lora_path"
        messages.append(err["message"].replace(path[:200], "P"))
    assert len(set(messages[:7])) == 1  # existing or not, outside is just "not inside"
    assert (await lora_api.client.get("/v1/adapters", headers=headers)).json() == {
        "adapters": []}  # nothing was stored


async def test_symlinks_inside_the_root_are_followed(lora_api: Api,
                                                     dirs: tuple[Path, Path]) -> None:
    root, _ = dirs
    _, headers = await lora_api.tenant()
    alias = root / "alias"
    if not alias.exists():
        alias.symlink_to(root / "good", target_is_directory=True)
    assert (await load(lora_api, headers, "aliased", "alias")).status_code == 200


async def test_what_the_folder_must_hold(lora_api: Api, dirs: tuple[Path, Path]) -> None:
    root, _ = dirs
    _, headers = await lora_api.tenant()
    refused(await load(lora_api, headers, "x", "no-such-folder"), 404, "not_found")
    refused(await load(lora_api, headers, "x", "good/adapter_config.json"), 404, "not_found")
    pickled = root / "pickled"
    pickled.mkdir(exist_ok=True)
    shutil.copy(root / "good" / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    refused(await load(lora_api, headers, "x", "pickled"), 415, "unsafe_format")
    empty = root / "empty"
    empty.mkdir(exist_ok=True)
    refused(await load(lora_api, headers, "x", "empty"), 422, "adapter_invalid")
    big = root / "big"
    big.mkdir(exist_ok=True)
    shutil.copy(root / "good" / "adapter_config.json", big)
    with open(big / "adapter_model.safetensors", "wb") as f:
        f.truncate(UPLOAD_LIMIT + 1)  # sparse: refused by its size, never read
    refused(await load(lora_api, headers, "x", "big"), 413, "payload_too_large")
    fifo = root / "fifo"
    fifo.mkdir(exist_ok=True)
    shutil.copy(root / "good" / "adapter_config.json", fifo)
    if not (fifo / "adapter_model.safetensors").exists():
        os.mkfifo(fifo / "adapter_model.safetensors")
    refused(await load(lora_api, headers, "x", "fifo"), 400, "invalid_path")  # no hang
    refused(await load(lora_api, headers, "x", "good\x00"), 400, "invalid_path")
    refused(await load(lora_api, headers, "../x", "good"), 400, "invalid_name")
    r = await lora_api.client.post("/v1/load_lora_adapter", headers=headers,
                                   json={"lora_name": "x"})
    assert refused(r, 400, "invalid_request")["param"] == "lora_path"
    assert (await lora_api.client.get("/v1/adapters", headers=headers)).json() == {
        "adapters": []}


async def test_no_root_configured_means_403(api: Api) -> None:
    _, headers = await api.tenant()
    err = refused(await load(api, headers, "x", "/tmp"), 403, "forbidden")
    assert "TESSERA_LORA_ADAPTER_ROOT" in err["message"]
    r = await api.client.post("/v1/unload_lora_adapter", headers=headers,
                              json={"lora_name": "x"})
    refused(r, 403, "forbidden")
