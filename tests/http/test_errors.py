"""Bad input of DESIGN section 6 over real HTTP: each gets its status, the one error shape
and a message naming the problem; nothing answers 500."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from typing import Any

import httpx
import torch
from torch import nn

from tessera.adapters import artifact
from tessera.adapters.safeio import read_safetensors, write_safetensors
from tests.factories import FACTORIES
from tests.http.conftest import CONTEXT_LIMIT, UPLOAD_LIMIT, Api


def error(r: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    err: dict[str, Any] = r.json()["error"]
    assert set(err) <= {"type", "message", "field", "param", "code"}
    assert err["type"] and err["message"]
    assert err["param"] == err.get("field") and err["code"] == err["type"]  # OpenAI's names
    for word in words:
        assert word in err["message"], (word, err)
    return err


def lora_files(base: nn.Module, seed: int = 1) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    adapter = FACTORIES["lora"](base, torch.Generator().manual_seed(seed))
    manifest, weights = artifact.dumps(adapter)
    tensors, _ = read_safetensors(weights)
    return json.loads(manifest), dict(tensors)


async def upload(api: Api, headers: dict[str, str], manifest: dict[str, Any],
                 weights: bytes, name: str = "bad", filename: str = "w.safetensors"
                 ) -> httpx.Response:
    return await api.client.post(f"/v1/adapters/{name}", headers=headers,
                                 files={"config": ("m.json", json.dumps(manifest).encode()),
                                        "weights": (filename, weights)})


async def test_upload_errors(api: Api, ref_base: nn.Module) -> None:
    _, headers = await api.tenant()
    manifest, tensors = lora_files(ref_base)
    good = write_safetensors(tensors)
    # pickle payload, and a .bin file name -> 415
    error(await upload(api, headers, manifest, pickle.dumps({"x": 1})), 415, "pickle")
    error(await upload(api, headers, manifest, good, filename="adapter_model.bin"), 415,
          "adapter_model.bin")
    # PEFT archive holding only a .bin -> 415
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in (("a/adapter_config.json", b'{"peft_type": "LORA"}'),
                           ("a/adapter_model.bin", pickle.dumps([1]))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    r = await api.client.post("/v1/adapters/bad", headers=headers,
                              files={"archive": ("a.tar.gz", buf.getvalue())})
    error(r, 415, "adapter_model.bin")
    # path traversal inside an archive -> 400
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("../adapter_config.json")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"{}"))
    r = await api.client.post("/v1/adapters/bad", headers=headers,
                              files={"archive": ("a.tar.gz", buf.getvalue())})
    error(r, 400, "..")
    # malformed safetensors -> 422
    error(await upload(api, headers, manifest, b"\x08\x00\x00\x00\x00\x00\x00\x00{bad}"),
          422, "safetensors")
    # shape mismatch -> 422 naming the tensor
    key = sorted(tensors)[0]
    bad = dict(tensors)
    bad[key] = torch.zeros(bad[key].shape[0], bad[key].shape[1] + 1)
    err = error(await upload(api, headers, manifest, write_safetensors(bad)), 422, "shape")
    assert err["field"] and key.split(".", 1)[1].rsplit(".", 1)[0] in err["field"]
    # NaN -> 422 naming the tensor
    nan = dict(tensors)
    nan[key] = nan[key].clone()
    nan[key][0, 0] = float("nan")
    err = error(await upload(api, headers, manifest, write_safetensors(nan)), 422, "NaN")
    assert err["field"] == key
    # bad names -> 400 (strict pattern); a name with '/' never reaches the route
    for name in ("..evil", "a" * 65, "-x"):
        error(await upload(api, headers, manifest, good, name=name), 400, "not allowed"
              if len(name) < 65 else "limit")
    r = await api.client.post("/v1/adapters/a%2F..%2Fb", headers=headers,
                              files={"config": ("m.json", b"{}"), "weights": ("w", good)})
    assert r.status_code in (400, 404) and "error" in r.json()
    # oversize: by Content-Length, and counted while streaming (chunked, no length)
    big = b"\0" * (UPLOAD_LIMIT + 1)
    error(await upload(api, headers, manifest, big), 413, "limit")

    async def chunks() -> Any:
        yield b"--xyz\r\nContent-Disposition: form-data; name=\"weights\"; filename=\"w\"\r\n\r\n"
        for _ in range(UPLOAD_LIMIT // 65536 + 2):
            yield b"\0" * 65536
    r = await api.client.post("/v1/adapters/bad", headers={
        **headers, "content-type": "multipart/form-data; boundary=xyz"}, content=chunks())
    error(r, 413, "limit")
    # nothing was stored by any of these
    assert (await api.client.get("/v1/adapters", headers=headers)).json() == {"adapters": []}
    # a good upload still works
    assert (await upload(api, headers, manifest, good, name="good")).status_code == 201


async def test_request_errors(api: Api) -> None:
    _, headers = await api.tenant()
    # over context: both numbers named
    r = await api.client.post("/v1/tasks/base/generate", headers=headers,
                              json={"prompt": "hello", "max_tokens": CONTEXT_LIMIT})
    error(r, 400, str(CONTEXT_LIMIT), "tokens")
    # pydantic validation: names the field (400 on the OpenAI routes, as OpenAI answers)
    r = await api.client.post("/v1/completions", headers=headers,
                              json={"model": "base", "prompt": "x", "temperature": -1})
    err = error(r, 400, "temperature")
    assert err["field"] == "temperature"
    r = await api.client.post("/v1/completions", headers=headers, json={"prompt": "x"})
    assert error(r, 400, "model")["field"] == "model"
    # unknown task, bad task name
    error(await api.client.post("/v1/completions", headers=headers,
                                json={"model": "nope", "prompt": "x"}), 404, "nope")
    error(await api.client.post("/v1/completions", headers=headers,
                                json={"model": "../x", "prompt": "x"}), 400, "not allowed")
    # activating a version that does not exist
    error(await api.client.post("/v1/tasks/t/activate", headers=headers,
                                json={"adapter": "missing", "version": 1}), 404)
