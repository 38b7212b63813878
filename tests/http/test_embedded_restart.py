"""Over real HTTP, with the embedded redis-server tessera owns (no Redis URL): after a
``kill -9`` of that server, tessera restarts it on the same data directory, admin calls that
need Redis work again within seconds, the data confirmed before the kill is still there,
and ``/metrics`` counts the restart."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.http.conftest import ADMIN_KEY, CONTEXT_LIMIT, UPLOAD_LIMIT, Api, admin
from tests.http.test_metrics_http import sample
from tests.live import (
    HermeticServerSettings,
    HermeticSettings,
    HermeticStoreSettings,
    LiveServer,
)

# long enough to see the outage (503) before the restart, short enough for a quick test
RESTART_DELAY_S = 1.0


@pytest.fixture
def embedded_live(builtin_dir: Path) -> Iterator[LiveServer]:
    # short path: the unix socket lives in the data dir (~104-byte limit)
    with tempfile.TemporaryDirectory(prefix="tsr-") as tmp:
        settings = HermeticServerSettings(
            admin_key=ADMIN_KEY, max_upload_bytes=UPLOAD_LIMIT, max_archive_bytes=UPLOAD_LIMIT,
            engine=HermeticSettings(builtin_dir=builtin_dir, device="cpu", dtype="float32",
                                    num_slots=2, max_rank=8, max_bottleneck_dim=16,
                                    context_limit=CONTEXT_LIMIT),
            store=HermeticStoreSettings(                     # no redis_url: tessera owns one
                data_dir=Path(tmp) / "data", appendfsync="always",
                embedded_watch_interval_s=0.05, embedded_restart_backoff_s=RESTART_DELAY_S))
        with LiveServer(settings) as server:
            yield server


async def test_killed_embedded_redis_is_restarted_and_admin_calls_work_again(
        embedded_live: LiveServer) -> None:
    handle = embedded_live.app.state.store_handle
    assert handle.embedded is not None
    async with httpx.AsyncClient(base_url=embedded_live.url, timeout=30) as client:
        api = Api(client)
        _, headers = await api.tenant()                         # confirmed before the kill
        scrape = (await client.get("/metrics")).text
        assert sample(scrape, "tessera_embedded_redis_up") == 1
        assert sample(scrape, "tessera_embedded_redis_restarts_total") == 0

        old_pid = handle.embedded.pid
        os.kill(old_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        statuses: list[int] = []
        while True:
            r = await client.post("/v1/tenants", json={"name": f"t{uuid.uuid4().hex[:10]}"},
                                  headers=admin())
            statuses.append(r.status_code)
            if r.status_code == 201:
                break
            assert r.status_code == 503, r.text                 # dependency down, not a 500
            ready = await client.get("/readyz")                 # readiness does not need it
            assert ready.status_code == 200, ready.text
            assert time.monotonic() - killed_at < 15, statuses
            await asyncio.sleep(0.1)
        assert statuses[0] == 503, statuses                     # the outage was real ...
        assert time.monotonic() - killed_at < RESTART_DELAY_S + 5  # ... and short

        assert handle.embedded.pid != old_pid
        r = await client.get("/v1/adapters", headers=headers)   # its key survived (AOF)
        assert r.status_code == 200, r.text
        scrape = (await client.get("/metrics")).text
        assert sample(scrape, "tessera_embedded_redis_restarts_total") == 1
        assert sample(scrape, "tessera_embedded_redis_restart_failures_total") == 0
        assert sample(scrape, "tessera_embedded_redis_up") == 1
