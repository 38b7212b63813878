"""The ``tessera`` command: flag/environment parsing, the upload encodings, admin commands
that load no torch, and a real ``python -m tessera.server.cli serve`` process (built-in model,
embedded redis-server) driven by the admin commands, then stopped by SIGTERM while a request
is streaming; its first run with no admin key; scripts/serve on a machine without
redis-server."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
import torch
from torch import nn

from tessera.adapters import artifact
from tessera.server import cli, client
from tessera.store.tenants import new_api_key
from tests.factories import FACTORIES

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("TESSERA_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_flags_override_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("TESSERA_NUM_SLOTS", "3")
    clean_env.setenv("TESSERA_DTYPE", "bfloat16")
    clean_env.setenv("TESSERA_STORE_REDIS_URL", "redis://redis:6379/0")
    clean_env.setenv("TESSERA_ADMIN_KEY", "sekrit")
    args = cli.build_parser().parse_args(
        ["serve", "--port", "9001", "--num-slots", "5", "--device", "cpu",
         "--model", "/models/x", "--drain-timeout", "7"])
    settings = cli.serve_settings(args)
    assert args.port == 9001 and args.host == "127.0.0.1"
    assert settings.engine.num_slots == 5  # flag wins
    assert settings.engine.dtype == "bfloat16"  # environment kept where no flag
    assert (settings.engine.device, settings.engine.model) == ("cpu", "/models/x")
    assert settings.engine.drain_timeout_s == 7
    assert settings.store.redis_url == "redis://redis:6379/0"
    assert settings.admin_key is not None and settings.admin_key.get_secret_value() == "sekrit"
    args = cli.build_parser().parse_args(["serve", "--redis-url", "redis://other:1/2"])
    assert cli.serve_settings(args).store.redis_url == "redis://other:1/2"


def test_defaults_and_invalid_values(clean_env: pytest.MonkeyPatch) -> None:
    settings = cli.serve_settings(cli.build_parser().parse_args(["serve"]))
    assert settings.engine.model is None and settings.store.redis_url is None  # built-ins
    with pytest.raises(cli.CliError, match="num_slots"):
        cli.serve_settings(cli.build_parser().parse_args(["serve", "--num-slots", "0"]))
    clean_env.setenv("TESSERA_MAX_QUEUE", "-1")
    with pytest.raises(cli.CliError, match="max_queue"):
        cli.serve_settings(cli.build_parser().parse_args(["serve"]))
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--dtype", "float8"])


def test_admin_commands_need_a_key(clean_env: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list", "--url", "http://127.0.0.1:9"]) == 1
    assert "no key" in capsys.readouterr().err
    assert cli.main(["list", "--url", "http://127.0.0.1:9", "--key", "k",
                     "--timeout", "2"]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_generated_keys_pass_as_command_line_arguments() -> None:
    """A bare token_urlsafe key starts with '-' one time in 64, and ``--key -Xy..`` then
    reads as a missing argument (a CI run met it); generated keys carry a prefix."""
    for prefix in ("tsk", "tsa"):  # tenant keys, the first-run admin key
        for _ in range(2000):
            key = new_api_key(prefix)
            assert key.startswith(prefix + "_")
            args = cli.build_parser().parse_args(["list", "--key", key, "tasks"])
            assert args.key == key


def test_upload_encodings(tmp_path: Path) -> None:
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"w" * 10)
    (folder / "README.md").write_text("not sent")
    with tarfile.open(fileobj=BytesIO(client.folder_archive(folder)), mode="r:gz") as tar:
        assert sorted(tar.getnames()) == sorted(client.PEFT_FILES)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match=r"adapter_config\.json"):
        client.folder_archive(folder)
    args = cli.build_parser().parse_args(["upload", "x", "--config", str(tmp_path / "no")])
    with pytest.raises(cli.CliError, match="both --config and --weights"):
        cli.check_upload_args(args)
    args = cli.build_parser().parse_args(["upload", "x", str(folder), "--weights", "w"])
    with pytest.raises(cli.CliError, match="not both"):
        cli.check_upload_args(args)


def test_upload_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                    ) -> None:
    """Local problems stop before any request (the URL is never reached)."""
    base = ["--url", "http://127.0.0.1:9", "--key", "k", "--timeout", "2"]
    (tmp_path / "peft").mkdir()
    assert cli.main(["upload", *base, "x", str(tmp_path / "peft")]) == 1
    assert "is not a PEFT adapter folder" in capsys.readouterr().err
    assert cli.main(["upload", *base, "x", str(tmp_path / "missing.tar.gz")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_admin_commands_load_no_torch() -> None:
    """The CLI and the client import neither torch, transformers, the engine nor the
    settings (tessera.engine.settings imports torch): `tessera --help` is fast."""
    heavy = ("torch", "transformers", "tessera.engine", "tessera.adapters", "tessera.server.app",
             "tessera.server.server_settings", "tessera.store.settings")
    code = ("import sys, tessera.server.cli, tessera.server.client; "
            f"loaded = [m for m in {heavy!r} if m in sys.modules]; "
            "assert not loaded, loaded; tessera.server.cli.main(['--help'])")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr  # --help exits 0
    assert "create-tenant" in done.stdout and "AssertionError" not in done.stderr


# --- a real server process -----------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                pids.append(int(entry.name))
    return pids


class Server:
    def __init__(self, process: subprocess.Popen[bytes], url: str, data_dir: Path,
                 log: Path) -> None:
        self.process, self.url, self.data_dir, self.log = process, url, data_dir, log


@contextlib.contextmanager
def running_server(builtin_dir: Path, root: Path, *, drain: str = "20",
                   admin_key: str | None = "admin-key",
                   extra_env: dict[str, str] | None = None) -> Iterator[Server]:
    """``python -m tessera.server.cli serve`` on a free port, its data under ``root`` (no
    TESSERA_* variable of the machine leaks in), once /healthz answers; killed at exit if
    still running."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env |= {"TESSERA_STORE_DATA_DIR": str(root / "redis"), "TESSERA_BUILTIN_DIR":
            str(builtin_dir), "TESSERA_DEVICE": "cpu", **(extra_env or {})}
    if admin_key is not None:
        env["TESSERA_ADMIN_KEY"] = admin_key
    log = root / f"server-{port}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tessera.server.cli", "serve", "--port", str(port),
             "--num-slots", "2", "--drain-timeout", drain],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    served = Server(process, f"http://127.0.0.1:{port}", root / "redis", log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(served.url + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "no /healthz within 60 s\n" + log.read_text()
            time.sleep(0.1)
        yield served
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture
def server_root() -> Iterator[Path]:
    # short path: the embedded redis listens on <data_dir>/redis.sock (108-byte limit)
    root = Path(tempfile.mkdtemp(prefix="tcli", dir="/tmp"))
    try:
        yield root
    finally:
        for pid in processes_mentioning(str(root)):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def server(builtin_dir: Path, server_root: Path, request: pytest.FixtureRequest
           ) -> Iterator[Server]:
    drain = str(getattr(request, "param", 20))  # --drain-timeout, seconds
    with running_server(builtin_dir, server_root, drain=drain) as served:
        yield served


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> object:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def test_serve_admin_and_sigterm_drain(server: Server, ref_base: nn.Module, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    url = ["--url", server.url]
    created = run_cli(capsys, "create-tenant", *url, "--key", "admin-key", "acme")
    assert isinstance(created, dict) and created["name"] == "acme"
    key = ["--key", created["api_key"]]
    assert cli.main(["create-tenant", *url, *key, "evil"]) != 0  # a tenant key is no admin
    assert "HTTP 403 forbidden: this endpoint needs the admin key" in capsys.readouterr().err

    adapter = FACTORIES["lora"](ref_base, torch.Generator().manual_seed(3))
    manifest, weights = artifact.dumps(adapter)
    (tmp_path / "manifest.json").write_bytes(manifest)
    (tmp_path / "weights.safetensors").write_bytes(weights)
    version = run_cli(capsys, "upload", *url, *key, "my-lora", "--config",
                      str(tmp_path / "manifest.json"), "--weights",
                      str(tmp_path / "weights.safetensors"))
    assert isinstance(version, dict) and version["version"] == 1
    run_cli(capsys, "activate", *url, *key, "summarise", "my-lora", "1")
    tasks = run_cli(capsys, "list", "tasks", *url, *key)
    assert isinstance(tasks, dict)
    assert [(t["task"], t["adapter"], t["version"]) for t in tasks["tasks"]] == \
        [("summarise", "my-lora", 1)]
    # `tessera list` as its own process: adapters with their versions, and no torch loaded
    listed = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "tessera.server.cli", "list", *url, *key],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    adapters = json.loads(listed.stdout)["adapters"]
    assert [(a["name"], [v["version"] for v in a["versions"]]) for a in adapters] == \
        [("my-lora", [1])]
    assert adapters[0]["versions"][0]["method"] == "lora"
    imported = {line.rsplit("|", 1)[-1].strip() for line in listed.stderr.splitlines()
                if line.startswith("import time:")}
    assert "tessera.server.client" in imported and "httpx" in imported  # the check sees imports
    assert not {m for m in imported if m.split(".")[0] in ("torch", "transformers", "engine")}

    # a streaming request in flight when SIGTERM arrives still finishes
    body = json.dumps({"model": "summarise", "prompt": "hello", "max_tokens": 400,
                       "temperature": 0, "ignore_eos": True, "stream": True}).encode()
    request = urllib.request.Request(server.url + "/v1/completions", data=body, headers={
        "Authorization": f"Bearer {created['api_key']}", "Content-Type": "application/json"})
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=60) as response:
        first = response.readline()
        assert first.startswith(b"data: "), first
        server.process.send_signal(signal.SIGTERM)
        rest = response.read().decode()
    events = [json.loads(line[6:]) for line in [first.decode(), *rest.splitlines()]
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert "data: [DONE]" in rest
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert len(events) == 400  # one chunk per token: every token was generated

    code = server.process.wait(timeout=40)
    log = server.log.read_text()
    assert code == 0, log
    assert time.monotonic() - started < 40
    assert "engine stopped" in log and "embedded redis-server stopped" in log
    assert processes_mentioning(str(server.data_dir)) == []  # the redis-server is gone
    with pytest.raises(OSError):  # and nothing listens any more
        urllib.request.urlopen(server.url + "/healthz", timeout=1)


@pytest.mark.parametrize("server", [1], indirect=True)
def test_sigterm_ends_streams_longer_than_the_drain_with_shutdown(server: Server) -> None:
    """A 1 s drain and a 2,000-token stream: the stream is not cut; its last chunk
    carries finish reason "shutdown", then [DONE]; the process exits 0."""
    created = json.loads(urllib.request.urlopen(urllib.request.Request(
        server.url + "/v1/tenants", data=json.dumps({"name": "acme"}).encode(),
        headers={"Authorization": "Bearer admin-key", "Content-Type": "application/json"}),
        timeout=30).read())
    body = json.dumps({"model": "base", "prompt": "hello", "max_tokens": 2000,
                       "temperature": 0, "ignore_eos": True, "stream": True}).encode()
    request = urllib.request.Request(server.url + "/v1/completions", data=body, headers={
        "Authorization": f"Bearer {created['api_key']}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        first = response.readline()
        assert first.startswith(b"data: "), first
        server.process.send_signal(signal.SIGTERM)
        rest = response.read().decode()
    lines = [line for line in [first.decode(), *rest.splitlines()] if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    last = json.loads(lines[-2][6:])
    assert last["choices"][0]["finish_reason"] == "shutdown", last
    assert len(lines) - 1 < 2000  # it really was cut short by the drain
    assert server.process.wait(timeout=40) == 0, server.log.read_text()


def test_scripts_serve() -> None:
    """scripts/serve on an environment that has torch and tessera: no install step; without
    redis-server it says how to get one; with it, it execs `tessera serve`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env["TESSERA_VENV"] = sys.prefix
    script = str(ROOT / "scripts" / "serve")
    missing = subprocess.run(
        [script, "--help"], env=env | {"TESSERA_STORE_REDIS_SERVER_BINARY": "no-such-redis"},
        capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1
    assert "apt-get install redis-server" in missing.stderr and "brew install redis" in \
        missing.stderr
    assert "installing" not in missing.stderr  # torch and tessera were already there
    ok = subprocess.run([script, "--help"], env=env, capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "usage: tessera serve" in ok.stdout and "--num-slots" in ok.stdout
    with_url = subprocess.run(
        [script, "--help"], env=env | {"TESSERA_STORE_REDIS_URL": "redis://x:1/0",
                                       "TESSERA_STORE_REDIS_SERVER_BINARY": "no-such-redis"},
        capture_output=True, text=True, timeout=120)
    assert with_url.returncode == 0, with_url.stderr  # an external Redis needs no binary


def test_first_run_generates_and_reuses_the_admin_key(builtin_dir: Path, server_root: Path
                                                      ) -> None:
    """No TESSERA_ADMIN_KEY: the first start writes a key (0600) beside the store's data
    directory and logs it with the next command, which works as printed; a restart reuses
    the key without printing it."""
    key_file = server_root / "admin.key"  # TESSERA_STORE_DATA_DIR is <root>/redis
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    with running_server(builtin_dir, server_root, admin_key=None) as first:
        log = first.log.read_text()
        found = re.search(r"(TESSERA_URL=\S+) TESSERA_ADMIN_KEY=([A-Za-z0-9_-]+) "
                          r"tessera create-tenant acme", log)
        assert found is not None, log
        assert found.group(1) == f"TESSERA_URL={first.url}" and str(key_file) in log
        key = found.group(2)
        assert key_file.read_text().strip() == key
        assert key_file.stat().st_mode & 0o777 == 0o600
        # the printed command, as printed (the key from the environment)
        created = subprocess.run(
            [sys.executable, "-m", "tessera.server.cli", "create-tenant", "acme"], cwd=ROOT,
            env=env | {"TESSERA_URL": first.url, "TESSERA_ADMIN_KEY": key},
            capture_output=True, text=True, timeout=60)
        assert created.returncode == 0, created.stderr
        assert json.loads(created.stdout)["name"] == "acme"
        first.process.send_signal(signal.SIGTERM)
        assert first.process.wait(timeout=40) == 0, first.log.read_text()

    with running_server(builtin_dir, server_root, admin_key=None) as second:
        log = second.log.read_text()
        assert key not in log and "no admin key was configured" not in log, log
        assert f"admin key from {key_file}" in log
        assert key_file.read_text().strip() == key
        with client.TesseraClient(second.url, key) as admin:
            assert admin.create_tenant("globex")["name"] == "globex"


def test_scripts_serve_installs_redis_as_root(tmp_path: Path) -> None:
    """No redis-server on the PATH: as root with apt-get, scripts/serve installs it and
    goes on; as another user (or when apt-get fails) it says how in one line and exits 1.
    (`id` and `apt-get` are stubs; the PATH holds only them, bash and the venv.)"""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "env", "dirname"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    calls = tmp_path / "apt.log"

    def stub(name: str, body: str) -> None:
        (bin_dir / name).write_text(f"#!{bin_dir / 'bash'}\n{body}\n")
        (bin_dir / name).chmod(0o755)

    stub("id", 'echo "$FAKE_UID"')
    stub("apt-get", f'echo "$*" >> {calls}\n[ -z "$FAKE_APT_FAIL" ] || exit 100\n'
                    f'if [ "$1" = install ]; then printf "#!/bin/sh\\n" > {bin_dir}/redis-server'
                    f"; chmod +x {bin_dir}/redis-server; fi")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env |= {"TESSERA_VENV": sys.prefix, "PATH": str(bin_dir), "FAKE_APT_FAIL": ""}
    script = str(ROOT / "scripts" / "serve")

    def run(**extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([script, "--help"], env=env | extra, capture_output=True,
                              text=True, timeout=120)

    for outcome in (run(FAKE_UID="1000"), run(FAKE_UID="0", FAKE_APT_FAIL="1")):
        assert outcome.returncode == 1
        lines = outcome.stderr.strip().splitlines()
        assert lines[-1].startswith("tessera: redis-server not found: install it")
        assert "sudo apt-get install redis-server" in lines[-1]
        assert "TESSERA_STORE_REDIS_URL" in lines[-1]
    assert calls.read_text().splitlines() == ["update -qq"]  # the failing root run only
    assert not (bin_dir / "redis-server").exists()

    calls.unlink()
    installed = run(FAKE_UID="0")
    assert installed.returncode == 0, installed.stderr
    assert "installing redis-server" in installed.stderr
    assert calls.read_text().splitlines() == ["update -qq", "install -y -qq redis-server"]
    assert "usage: tessera serve" in installed.stdout
