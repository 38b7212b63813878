"""Archive bombs over real HTTP (DESIGN section 6): 413/400 before the work, and a large
archive that is allowed is read off the event loop, so ``/healthz`` answers meanwhile."""

from __future__ import annotations

import asyncio
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from torch import nn

from tessera.store.embedded import EmbeddedRedis
from tests.http.conftest import UPLOAD_LIMIT, Api, server_settings
from tests.http.test_errors import error
from tests.http.test_inference import make_peft_folder
from tests.live import LiveServer
from tests.server.test_uploads import GIB, gzip_then_zeros, tar_member, tar_of, zip_of

PeftFiles = list[tuple[str, bytes]]


@pytest.fixture(scope="module")
def peft_files(ref_base: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> PeftFiles:
    folder = make_peft_folder(ref_base, tmp_path_factory.mktemp("peft"))
    return [(f"my-adapter/{name}", (folder / name).read_bytes())
            for name in ("adapter_config.json", "adapter_model.safetensors")]


@pytest.fixture(scope="module")
def roomy(redis_server: EmbeddedRedis, builtin_dir: Path) -> Iterator[LiveServer]:
    """A server allowing archives of 2 GiB uncompressed (the session one allows 1 MiB)."""
    settings = server_settings(redis_server, builtin_dir).model_copy(
        update={"max_upload_bytes": 8 << 20, "max_archive_bytes": 2 * GIB})
    with LiveServer(settings) as server:
        yield server


async def post_archive(api: Api, headers: dict[str, str], filename: str, data: bytes,
                       name: str = "bomb") -> tuple[httpx.Response, float]:
    start = time.monotonic()
    r = await api.client.post(f"/v1/adapters/{name}", headers=headers,
                              files={"archive": (filename, data)})
    return r, time.monotonic() - start


async def test_bombs_are_refused_before_the_work(api: Api, peft_files: PeftFiles) -> None:
    _, headers = await api.tenant()
    adapter = b"".join(tar_member(name, data) for name, data in peft_files)
    # a valid adapter + a member declaring 20 GiB of zeros (512 MiB of them follow) -> 413
    # at its header, nothing decompressed
    bomb = gzip_then_zeros(adapter + tar_member("my-adapter/zeros.bin", size=20 * GIB), 512)
    assert len(bomb) < UPLOAD_LIMIT - 4096
    r, elapsed = await post_archive(api, headers, "bomb.tar.gz", bomb)
    err = error(r, 413, "zeros.bin", "limit")
    assert err["type"] == "payload_too_large" and err["field"] == "archive"
    assert elapsed < 2, elapsed
    # thousands of members: zip (counted from its central directory) and tar.gz -> 400
    many = [*peft_files, *((f"my-adapter/f{i}", b"") for i in range(5000))]
    data = zip_of(many, zipfile.ZIP_STORED)
    assert len(data) < UPLOAD_LIMIT - 4096
    err = error((await post_archive(api, headers, "many.zip", data))[0], 400,
                "5002 members", "at most 64")
    assert err["type"] == "invalid_archive" and err["field"] == "archive"
    err = error((await post_archive(api, headers, "many.tgz",
                                    gzip_then_zeros(tar_of(many), 0, complete=True)))[0],
                400, "members", "at most 64")
    assert err["type"] == "invalid_archive" and err["field"] == "archive"
    # nothing was stored; the adapter alone is accepted
    assert (await api.client.get("/v1/adapters", headers=headers)).json() == {"adapters": []}
    r, _ = await post_archive(api, headers, "ok.tar.gz", gzip_then_zeros(
        tar_of(peft_files), 0, complete=True), name="ok")
    assert r.status_code == 201, r.text


async def test_healthz_answers_while_a_large_archive_is_read(roomy: LiveServer,
                                                             peft_files: PeftFiles) -> None:
    # allowed: a 1 GiB member of zeros beside the adapter, passed over by decompressing it
    # (seconds of work); the end-of-archive blocks are zeros too
    prefix = b"".join(tar_member(name, data) for name, data in peft_files)
    prefix += tar_member("my-adapter/optimizer.raw", size=GIB)
    archive = gzip_then_zeros(prefix, 1024 + 1, complete=True)
    async with httpx.AsyncClient(base_url=roomy.url, timeout=120) as client:
        api = Api(client)
        _, headers = await api.tenant()
        upload = asyncio.create_task(post_archive(api, headers, "big.tar.gz", archive,
                                                  name="big"))
        latencies: list[float] = []

        async def probe() -> None:
            await asyncio.sleep(0.2)  # the body is sent and being read by then
            while not upload.done():
                start = time.monotonic()
                assert (await client.get("/healthz")).status_code == 200
                latencies.append(time.monotonic() - start)
                await asyncio.sleep(0.05)

        (r, elapsed), _ = await asyncio.gather(upload, probe())
    assert r.status_code == 201, r.text
    assert len(latencies) >= 3, (elapsed, latencies)
    assert max(latencies) < 0.5, (elapsed, max(latencies))
