"""``tessera train ... --upload URL`` against a live server (the real app under uvicorn, a
real redis-server, the same random built-in base the runs train on): an adapter is stored
and its task bound; a HyperLoader becomes a hypernetwork version with one served task
``PREFIX-T`` per trained task; a new task embedding is registered on the server's
hypernetwork (its latest version, or ``NAME@VERSION``) and served — and refused, naming
why, when the server's version is not the hypernetwork it was trained against. Tiny step
counts: what is checked is what reaches the server, not accuracy (tests/http/
test_demo_served.py serves trained HyperLoader tasks as they trained)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tessera.server import cli
from tessera.server.client import TesseraClient
from tessera.store.embedded import EmbeddedRedis
from tessera.train.base import Base
from tests.http.conftest import ADMIN_KEY, server_settings
from tests.live import LiveServer
from tests.store.conftest import redis_server  # noqa: F401  (fixture)
from tests.train.conftest import task_files

QUICK = ["--steps", "2", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def live(redis_server: EmbeddedRedis, random_base: Base) -> Iterator[LiveServer]:  # noqa: F811
    with LiveServer(server_settings(redis_server, random_base.path)) as server:
        yield server


@pytest.fixture
def key(live: LiveServer) -> str:
    with TesseraClient(live.url, ADMIN_KEY) as admin:
        return admin.create_tenant(f"t{uuid.uuid4().hex[:10]}")["api_key"]


def train(args: list[str], base: Base, capsys: pytest.CaptureFixture[str]
          ) -> tuple[int, dict[str, object] | None, str]:
    status = cli.main(["train", *args, "--base", str(base.path), *QUICK])
    captured = capsys.readouterr()
    return status, json.loads(captured.out) if status == 0 else None, captured.err


def test_adapter_upload_binds_its_task(live: LiveServer, key: str, random_base: Base,
                                       suite_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    files = task_files(suite_dir, "upper")
    status, summary, err = train(
        ["hut", "--data", str(files.train), "--out", str(tmp_path / "caps"), "--rank", "2",
         "--upload", live.url, f"--key={key}", "--task", "shout"], random_base, capsys)
    assert status == 0, err
    assert summary is not None and summary["upload"] == {"adapter": "caps", "version": 1,
                                                         "task": "shout"}
    with TesseraClient(live.url, key) as client:
        assert client.adapter("caps")["versions"][0]["method"] == "hut"
        assert (client.task("shout")["adapter"], client.task("shout")["version"]) == ("caps", 1)
        assert client.generate("shout", "upper: hello\n", max_tokens=3,
                               ignore_eos=True)["completion_tokens"] == 3


def test_hyperloader_then_a_new_task_embedding(live: LiveServer, key: str,
                                               random_base: Base, suite_dir: Path,
                                               tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    up, rot, caesar = (task_files(suite_dir, t) for t in ("upper", "rot13", "caesar"))
    upload = ["--upload", live.url, f"--key={key}"]
    status, summary, err = train(
        ["hyperloader", "--data", f"upper={up.train}", "--data", f"rot13={rot.train}",
         "--out", str(tmp_path / "multi"), *upload], random_base, capsys)
    assert status == 0, err
    assert summary is not None and summary["upload"] == {
        "hypernetwork": "multi", "version": 1,
        "tasks": {"rot13": "multi-rot13", "upper": "multi-upper"}}

    # the new task: registered on the latest version (the one just uploaded), served under
    # the prefix given by --task
    status, summary, err = train(
        ["task-embedding", "--hypernet", str(tmp_path / "multi"),
         "--data", f"caesar={caesar.train}", "--out", str(tmp_path / "new"),
         "--hypernetwork", "multi", "--task", "demo", *upload], random_base, capsys)
    assert status == 0, err
    assert summary is not None and summary["upload"] == {
        "hypernetwork": "multi", "version": 1, "tasks": {"caesar": "demo-caesar"}}

    with TesseraClient(live.url, key) as client:
        assert client.hypernetwork_version("multi", 1)["tasks"] == ["caesar", "rot13",
                                                                   "upper"]
        bound = {t["task"]: (t["hypernetwork"], t["version"], t["hyper_task"])
                 for t in client.tasks()}
        assert bound == {"multi-upper": ("multi", 1, "upper"),
                         "multi-rot13": ("multi", 1, "rot13"),
                         "demo-caesar": ("multi", 1, "caesar")}
        for task in bound:  # each HyperLoader task's adapter is generated and serves
            out = client.generate(task, "caesar: hello\n", max_tokens=3, ignore_eos=True)
            assert out["completion_tokens"] == 3
        # a second version whose weights differ (the first run's output holds caesar too)
        other = client.upload_hypernetwork("multi", tmp_path / "new")
        assert other["version"] == 2

    # the latest version is now v2: not what a new embedding against `multi` trained with
    status, _, err = train(
        ["task-embedding", "--hypernet", str(tmp_path / "multi"),
         "--data", f"rot13b={rot.train}", "--out", str(tmp_path / "late"),
         "--hypernetwork", "multi", *upload], random_base, capsys)
    assert status == 1
    assert "hypernetwork 'multi' v2 on the server is not the one the embedding was " \
        "trained against" in err, err
    # ... its version named: registered there, served as multi-rot13b (prefix: the name)
    status, summary, err = train(
        ["task-embedding", "--hypernet", str(tmp_path / "multi"),
         "--data", f"rot13b={rot.train}", "--out", str(tmp_path / "late1"),
         "--hypernetwork", "multi@1", *upload], random_base, capsys)
    assert status == 0, err
    assert summary is not None and summary["upload"] == {
        "hypernetwork": "multi", "version": 1, "tasks": {"rot13b": "multi-rot13b"}}
    with TesseraClient(live.url, key) as client:
        assert client.task("multi-rot13b")["hyper_task"] == "rot13b"
        assert client.hypernetwork_version("multi", 2)["tasks"] == ["caesar", "rot13",
                                                                   "upper"]


def test_upload_refusals_name_the_server_answer(live: LiveServer, key: str,
                                                random_base: Base, suite_dir: Path,
                                                tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    up = task_files(suite_dir, "upper")
    status, _, err = train(["hyperloader", "--data", f"upper={up.train}",
                            "--out", str(tmp_path / "multi")], random_base, capsys)
    assert status == 0, err
    status, _, err = train(
        ["task-embedding", "--hypernet", str(tmp_path / "multi"),
         "--data", f"shout={up.train}", "--out", str(tmp_path / "new"),
         "--hypernetwork", "absent", "--upload", live.url, f"--key={key}"], random_base, capsys)
    assert status == 1
    assert f"upload to {live.url} failed" in err and "HTTP 404 not_found" in err, err
    status, _, err = train(
        ["hyperloader", "--data", f"upper={up.train}", "--out", str(tmp_path / "again"),
         "--upload", live.url, "--key", "not-a-key"], random_base, capsys)
    assert status == 1 and "HTTP 401" in err, err
    summary = json.loads((tmp_path / "again" / "training.json").read_text())
    assert (tmp_path / "again" / "manifest.json").is_file()  # trained, then refused
    assert summary["method"] == "hyperloader" and "upload" not in summary
