"""``tessera train --upload``: the artifact goes to the server through TesseraClient (a PEFT
folder as an archive of its two files, tessera's format as manifest + weights) and the new
version is activated for the task. The server side is a recording transport here; the
HTTP tests serve trained adapters from a real server."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import httpx
import pytest

from tessera.server.client import TesseraClient
from tessera.train.upload import upload_and_activate


class Recorder:
    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path.startswith("/v1/adapters/"):
            return httpx.Response(201, json={"name": "ad", "version": 3, "method": "x"})
        body = json.loads(request.content)
        return httpx.Response(200, json={"task": "t1", "adapter": body["adapter"],
                                         "version": body["version"], "revision": 1})


def multipart_names(request: httpx.Request) -> list[str]:
    return re.findall(r'; name="([^"]+)"', request.read().decode("latin-1"))


@pytest.mark.parametrize("kind", ["peft", "tessera"])
def test_upload_then_activate(tmp_path: Path, kind: str) -> None:
    files = (("adapter_config.json", "adapter_model.safetensors") if kind == "peft"
             else ("manifest.json", "weights.safetensors"))
    for name in files:
        (tmp_path / name).write_bytes(b"{}")
    (tmp_path / "training.json").write_text("{}")  # not sent
    recorder = Recorder()
    with TesseraClient("http://srv", "key", transport=httpx.MockTransport(recorder)) as client:
        done = upload_and_activate(client, tmp_path, "ad", "t1")
    upload, activate = recorder.requests
    assert upload.method == "POST" and upload.url.path == "/v1/adapters/ad"
    assert upload.headers["authorization"] == "Bearer key"
    if kind == "peft":
        assert multipart_names(upload)[0] == "archive"
        body = upload.read()
        archive = body[body.index(b"\x1f\x8b"):]  # the gzip stream inside the multipart
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            assert sorted(tar.getnames()) == sorted(files)
    else:
        assert multipart_names(upload)[:2] == ["config", "weights"]
    assert activate.url.path == "/v1/tasks/t1/activate"
    assert json.loads(activate.content) == {"adapter": "ad", "version": 3}
    assert done.version["version"] == 3 and done.task["task"] == "t1"


def test_a_folder_without_an_adapter_is_refused(tmp_path: Path) -> None:
    with TesseraClient("http://srv", "key",
                       transport=httpx.MockTransport(Recorder())) as client, \
            pytest.raises(ValueError, match="neither a PEFT adapter nor a tessera artifact"):
        upload_and_activate(client, tmp_path, "ad", "t1")
