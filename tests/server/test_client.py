"""tessera.server.client.TesseraClient against a live server (the real app under uvicorn, a real
redis-server, the built-in model): tenants, the three upload forms, activation, listings
with versions, native generation, HyperLoader hypernetworks (upload, listings, a new task
embedding, a task bound to a HyperLoader task and served), and errors as TesseraError
carrying the server's JSON — including the 401 of a server whose admin endpoints are
disabled."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from torch import nn

from tessera.adapters import artifact
from tessera.adapters.safeio import write_safetensors
from tessera.server.client import (
    TesseraClient,
    TesseraConnectionError,
    TesseraError,
    folder_archive,
)
from tessera.store.embedded import EmbeddedRedis
from tests.factories import FACTORIES, randn
from tests.factories.hyperloader import make_hypernetwork
from tests.http.conftest import ADMIN_KEY, server_settings
from tests.http.test_inference import make_peft_folder
from tests.live import LiveServer
from tests.store.conftest import redis_server  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def live(redis_server: EmbeddedRedis, builtin_dir: Path) -> Iterator[LiveServer]:  # noqa: F811
    with LiveServer(server_settings(redis_server, builtin_dir)) as server:
        yield server


@pytest.fixture
def tenant_key(live: LiveServer) -> str:
    with TesseraClient(live.url, ADMIN_KEY) as admin:
        name = f"t{uuid.uuid4().hex[:10]}"
        created = admin.create_tenant(name)
    assert created["name"] == name and created["api_key"]
    return created["api_key"]


def test_upload_activate_list_generate(live: LiveServer, tenant_key: str, ref_base: nn.Module,
                                       tmp_path: Path) -> None:
    peft = make_peft_folder(ref_base, tmp_path)
    (tmp_path / "peft.tar.gz").write_bytes(folder_archive(peft))
    adapter = FACTORIES["lora"](ref_base, torch.Generator().manual_seed(3))
    manifest, weights = artifact.dumps(adapter)
    (tmp_path / "manifest.json").write_bytes(manifest)

    with TesseraClient(live.url + "/", tenant_key) as client:
        first = client.upload("peft", peft)  # a folder
        assert (first["name"], first["version"], first["method"]) == ("peft", 1, "lora")
        assert first["format"] and first["size"] > 0 and len(first["sha256"]) == 64
        assert client.upload("peft", tmp_path / "peft.tar.gz")["version"] == 2  # an archive
        mine = client.upload_files("mine", tmp_path / "manifest.json", weights)  # file+bytes
        assert (mine["name"], mine["version"]) == ("mine", 1)

        assert sorted(client.adapter_names()) == ["mine", "peft"]
        listed = {a["name"]: [v["version"] for v in a["versions"]] for a in client.adapters()}
        assert listed == {"peft": [1, 2], "mine": [1]}
        assert client.adapter("mine")["versions"] == [mine]

        task = client.activate("summarise", "peft", 2)
        assert (task["task"], task["adapter"], task["version"]) == ("summarise", "peft", 2)
        moved = client.activate("summarise", "mine", 1, expected_revision=task["revision"])
        assert moved["revision"] > task["revision"]
        assert [(t["task"], t["adapter"], t["version"]) for t in client.tasks()] == \
            [("summarise", "mine", 1)]
        assert client.task("summarise")["revision"] == moved["revision"]

        out = client.generate("summarise", "hello", max_tokens=5, temperature=0,
                              ignore_eos=True)
        assert (out["task"], out["finish_reason"], out["completion_tokens"]) == \
            ("summarise", "length", 5)
        assert len(out["token_ids"]) == 5 and isinstance(out["text"], str)
        again = client.generate("summarise", out["token_ids"][:2], max_tokens=3, seed=1,
                                temperature=0, ignore_eos=True)  # token-id prompt
        assert again["prompt_tokens"] == 2 and len(again["token_ids"]) == 3
        chat = client.generate("base", messages=[{"role": "user", "content": "hi"}],
                               max_tokens=2, temperature=0, ignore_eos=True)
        assert chat["completion_tokens"] == 2


def test_hypernetworks_tasks_and_hyper_activation(live: LiveServer, tenant_key: str,
                                                  ref_base: nn.Module, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(5)
    hypernet = make_hypernetwork(ref_base, gen)
    hypernet.register_task("upper", randn(gen, hypernet.config.task_dim, scale=1.0))
    artifact.save_hypernetwork(hypernet, tmp_path / "hyper")  # manifest.json, weights
    manifest, weights = artifact.dumps_hypernetwork(hypernet)
    embedding = write_safetensors({"embedding": randn(gen, hypernet.config.task_dim)})

    with TesseraClient(live.url, tenant_key) as client:
        first = client.upload_hypernetwork("multi", tmp_path / "hyper")  # a folder
        assert (first["name"], first["version"], first["tasks"]) == ("multi", 1, ["upper"])
        assert first["config"]["task_dim"] == hypernet.config.task_dim
        second = client.upload_hypernetwork_files("multi", manifest, weights)  # bytes
        assert second["version"] == 2 and len(second["sha256"]) == 64
        assert client.hypernetwork_names() == ["multi"]
        assert client.hypernetwork("multi") == {"name": "multi", "versions": [first, second]}
        assert client.hypernetworks() == [client.hypernetwork("multi")]
        assert client.hypernetwork_version("multi", 1) == first

        (tmp_path / "embedding.safetensors").write_bytes(embedding)
        added = client.register_hyper_task("multi", 1, "new-skill",
                                           tmp_path / "embedding.safetensors")
        assert added["version"] == 1 and added["tasks"] == ["new-skill", "upper"]
        assert client.hypernetwork_version("multi", 2)["tasks"] == ["upper"]  # v1 only

        bound = client.activate_hyper("served-new", "multi", 1, "new-skill")
        assert (bound["task"], bound["hypernetwork"], bound["version"], bound["hyper_task"],
                bound["adapter"]) == ("served-new", "multi", 1, "new-skill", None)
        moved = client.activate_hyper("served-new", "multi", 1, "upper",
                                      expected_revision=bound["revision"])
        assert moved["revision"] > bound["revision"] and moved["hyper_task"] == "upper"
        with pytest.raises(TesseraError) as stale:
            client.activate_hyper("served-new", "multi", 1, "new-skill",
                                  expected_revision=bound["revision"])
        assert stale.value.status == 409
        assert client.task("served-new")["hyper_task"] == "upper"
        out = client.generate("served-new", "hello", max_tokens=4, temperature=0,
                              ignore_eos=True)  # the adapter generated on first use
        assert out["completion_tokens"] == 4

        for call, status in ((lambda: client.hypernetwork("nothing"), 404),
                             (lambda: client.hypernetwork_version("multi", 3), 404),
                             (lambda: client.register_hyper_task("multi", 3, "t", embedding),
                              404),
                             (lambda: client.activate_hyper("t", "multi", 1, "unknown"), 404),
                             (lambda: client.register_hyper_task(  # not [task_dim]
                                 "multi", 1, "t", write_safetensors(
                                     {"embedding": torch.zeros(hypernet.config.task_dim + 1)})),
                              422),
                             (lambda: client.upload_hypernetwork_files("multi", b"{}", weights),
                              422)):
            with pytest.raises(TesseraError) as refused:
                call()
            assert refused.value.status == status, refused.value
        with pytest.raises(ValueError, match="not a hypernetwork artifact folder"):
            client.upload_hypernetwork("multi", tmp_path)  # no manifest.json here
        assert [v["version"] for v in client.hypernetwork("multi")["versions"]] == [1, 2]


def test_errors_carry_the_server_json(live: LiveServer, tenant_key: str) -> None:
    with TesseraClient(live.url, tenant_key) as client:
        with pytest.raises(TesseraError) as missing:
            client.adapter("nothing-here")
        assert missing.value.status == 404 and missing.value.type == "not_found"
        raw = httpx.get(f"{live.url}/v1/adapters/nothing-here", timeout=30,
                        headers={"Authorization": f"Bearer {tenant_key}"}).json()
        assert missing.value.error == raw["error"]  # exactly what the server said
        assert str(missing.value).startswith("GET /v1/adapters/nothing-here: HTTP 404")

        with pytest.raises(TesseraError) as bad:
            client.generate("base", "hi", temperature=-1)
        assert bad.value.status in (400, 422) and bad.value.field is not None

        with pytest.raises(TesseraError) as forbidden:  # a tenant key is no admin key
            client.create_tenant("evil")
        assert (forbidden.value.status, forbidden.value.type) == (403, "forbidden")

    with TesseraClient(live.url) as anonymous, pytest.raises(TesseraError) as no_key:
        anonymous.tasks()
    assert no_key.value.status == 401 and "missing API key" in no_key.value.message

    with TesseraClient(live.url, tenant_key) as client, \
            pytest.raises(ValueError, match="not a PEFT adapter folder"):
        client.upload("x", Path(__file__).parent)


def test_unreachable_server_and_bad_urls() -> None:
    with TesseraClient("http://127.0.0.1:9", "k", timeout=2) as client, \
            pytest.raises(TesseraConnectionError, match=r"cannot reach http://127\.0\.0\.1:9"):
        client.tasks()
    with pytest.raises(ValueError, match=r"give http:// or https://"):
        TesseraClient("localhost:8000")
    with pytest.raises(ValueError, match="invalid server URL"):
        TesseraClient("http://[::1")


def test_non_json_errors() -> None:
    """An answer that is not tessera's (a proxy's 502 page) still raises TesseraError."""
    transport = httpx.MockTransport(lambda request: httpx.Response(502, text="<h1>bad</h1>"))
    with TesseraClient("http://proxy", "k", transport=transport) as client, \
            pytest.raises(TesseraError) as error:
        client.tasks()
    assert (error.value.status, error.value.type, error.value.message) == \
        (502, "http_error", "<h1>bad</h1>")


def test_admin_endpoints_disabled_say_so(redis_server: EmbeddedRedis,  # noqa: F811
                                         builtin_dir: Path) -> None:
    """A server with no admin key: every admin call is 401 saying why, whatever key is
    sent (none, a guess, a tenant's); tenant endpoints are unaffected."""
    settings = server_settings(redis_server, builtin_dir).model_copy(
        update={"admin_key": None})
    with LiveServer(settings) as server:
        for key in (None, ADMIN_KEY, "guess"):
            with TesseraClient(server.url, key) as admin, \
                    pytest.raises(TesseraError) as denied:
                admin.create_tenant("acme")
            assert (denied.value.status, denied.value.type) == (401, "unauthorized")
            assert denied.value.message == ("admin endpoints are disabled: no admin key is "
                                            "configured (set TESSERA_ADMIN_KEY)")
        with TesseraClient(server.url, "guess") as client, \
                pytest.raises(TesseraError) as tenant_call:
            client.tasks()
        assert tenant_call.value.message == "invalid API key"
