"""A pod stop, as the kubelet does it, against the real server process: the container's
command (the image's ENTRYPOINT and CMD, which the manifest does not override) with the
manifest's environment (the image's ENV, then the ConfigMap, then the Secret references),
serving long streams; then the preStop hook runs (the manifest's own command) while the
streams go on, then SIGTERM. Every stream must end with a finish reason and [DONE],
/readyz must answer 503 while the server drains, and the process must exit 0 within
terminationGracePeriodSeconds counted from the start of preStop, as the kubelet counts.

What differs from a cluster, and only that: no GPU (device cpu), the built-in model in
place of the mounted one, loopback and a free port in place of 0.0.0.0:8000, the mount
paths as temporary directories, and a local redis-server started from the manifest's own
redis.conf with the Secret's password in place of the Redis Service."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tessera.store.embedded import free_port
from tests.deploy.manifests import (
    SECRET,
    Doc,
    config_map,
    dockerfile_stages,
    env_of,
    exec_form,
    final_image_env,
    one,
    render,
    tessera_container,
)

STREAM_LEAD_S = 4  # the streams start this long before preStop ends
FINISH_REASONS = {"stop", "length", "shutdown"}


def get_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout} s")


def in_engine(url: str) -> int:
    """Requests running or waiting in the engine, from the router gauges of /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    values = dict(re.findall(r"^(tessera:num_requests_(?:waiting|running)) (\S+)$", text,
                             flags=re.M))
    return sum(int(float(v)) for v in values.values())


@dataclass
class Stream:
    """One streaming completion read to its end in a thread; keeps the last events."""

    url: str
    key: str
    max_tokens: int
    first: threading.Event = field(default_factory=threading.Event)
    tail: list[str] = field(default_factory=list)
    chunks: int = 0
    error: str | None = None
    ended_at: float | None = None

    def run(self) -> None:
        body = json.dumps({"model": "base", "prompt": "a", "max_tokens": self.max_tokens,
                           "temperature": 0, "ignore_eos": True, "stream": True}).encode()
        request = urllib.request.Request(self.url + "/v1/completions", data=body, headers={
            "Authorization": f"Bearer {self.key}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                for raw in response:
                    line = raw.decode().strip()
                    if line.startswith("data: "):
                        self.chunks += 1
                        self.first.set()
                        self.tail = [*self.tail[-2:], line[6:]]
        except Exception as exc:  # reported by the test
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.ended_at = time.monotonic()
            self.first.set()

    def finish_reason(self) -> str | None:
        if len(self.tail) < 2 or self.tail[-1] != "[DONE]":
            return None
        reason = json.loads(self.tail[-2])["choices"][0]["finish_reason"]
        return str(reason) if reason is not None else None


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tdd", dir="/tmp"))  # short: unix socket paths
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def listening(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def start_redis(docs: list[Doc], root: Path) -> tuple[subprocess.Popen[bytes], int]:
    """redis-server with the overlay's redis.conf + memory.conf and the Secret's password,
    as the StatefulSet's init container assembles them."""
    stateful = one(docs, "StatefulSet", "tessera-redis")
    pod = stateful["spec"]["template"]["spec"]
    name = next(v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v)
    files = config_map(docs, name)
    (root / "redis-data").mkdir()
    port = free_port()
    for file_name, text in files.items():
        text = text.replace("/etc/redis/", f"{root}/")
        text = re.sub(r"^dir .*$", f"dir {root}/redis-data", text, flags=re.M)
        text = re.sub(r"^port .*$", f"port {port}", text, flags=re.M)
        text = re.sub(r"^bind .*$", "bind 127.0.0.1", text, flags=re.M)
        (root / file_name).write_text(text)
    with open(root / "redis.conf", "a") as conf:
        conf.write(f'requirepass "{SECRET["stringData"]["REDIS_PASSWORD"]}"\n')
    server = subprocess.Popen(["redis-server", str(root / "redis.conf")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: listening(port), 20, "redis-server listening")
    return server, port


@pytest.mark.parametrize("overlay", ["gpu-prod", "cpu-dev"])
def test_pod_stop_drains_every_stream(overlay: str, builtin_dir: Path, root: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is needed (.ci/run installs it)")
    docs = render(overlay)
    pod = one(docs, "Deployment", "tessera")["spec"]["template"]["spec"]
    container = tessera_container(docs)
    final = dockerfile_stages()[-1]

    # the container's command: the image's ENTRYPOINT + CMD (args would replace CMD)
    argv = exec_form(final, "ENTRYPOINT") + container.get("args", exec_form(final, "CMD"))
    assert argv == ["tessera", "serve"]
    executable = shutil.which(argv[0], path=str(Path(sys.executable).parent))
    assert executable, "the tessera console script is not installed"

    # the environment: image ENV < envFrom < env; Secret references from the Secret
    env: dict[str, str] = {k: v for k, v in final_image_env().items() if k != "PATH"}
    secrets = SECRET["stringData"]
    for name, value in env_of(docs, container).items():
        if value is None:
            ref = next(v["valueFrom"]["secretKeyRef"] for v in container["env"]
                       if v["name"] == name)
            value = secrets[ref["key"]]
        env[name] = value
    # the mounts, as directories of their own
    for mount in container["volumeMounts"]:
        local = root / "mnt" / mount["mountPath"].strip("/").replace("/", "_")
        local.mkdir(parents=True)
        for name, value in env.items():
            if value == mount["mountPath"] or value.startswith(mount["mountPath"] + "/"):
                env[name] = str(local) + value[len(mount["mountPath"]):]
                Path(env[name]).mkdir(parents=True, exist_ok=True)
    redis, redis_port = start_redis(docs, root)
    url_host = re.search(r"@([^/]+)/", env["TESSERA_STORE_REDIS_URL"])
    assert url_host is not None
    env["TESSERA_STORE_REDIS_URL"] = env["TESSERA_STORE_REDIS_URL"].replace(
        url_host.group(1), f"127.0.0.1:{redis_port}")
    port = free_port()
    env |= {"TESSERA_HOST": "127.0.0.1", "TESSERA_PORT": str(port), "TESSERA_DEVICE": "cpu",
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    env.pop("TESSERA_MODEL", None)
    env["TESSERA_BUILTIN_DIR"] = str(builtin_dir)
    url = f"http://127.0.0.1:{port}"

    log = root / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([executable, *argv[1:]], env=env, cwd=env["HOME"],
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        startup = container["startupProbe"]
        wait_for(lambda: get_status(url + "/readyz") == 200,
                 startup["periodSeconds"] * startup["failureThreshold"],
                 "ready\n" + log.read_text())
        request = urllib.request.Request(url + "/v1/tenants", data=b'{"name": "acme"}',
                                         headers={"Content-Type": "application/json",
                                                  "Authorization":
                                                  f"Bearer {secrets['TESSERA_ADMIN_KEY']}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            key = json.loads(response.read())["api_key"]

        # the kubelet: preStop (the manifest's own command, run for real), then SIGTERM;
        # the grace period counts from the start of preStop. Traffic still arriving while
        # the endpoints update: the streams start shortly before preStop ends, more work
        # than the drain allows (every batch row busy, the rest queued).
        grace = pod["terminationGracePeriodSeconds"]
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        stopping = time.monotonic()
        hook = threading.Thread(target=subprocess.run, args=(pre_stop,),
                                kwargs={"check": True, "env": env, "timeout": grace})
        hook.start()
        lead = float(pre_stop[1]) - STREAM_LEAD_S if pre_stop[0] == "sleep" else 0.0
        time.sleep(max(lead, 0.0))
        config = {**env, **config_map(docs, container["envFrom"][0]["configMapRef"]["name"])}
        rows = int(config.get("TESSERA_MAX_BATCH_ROWS", 32))
        count = rows + min(32, int(config["TESSERA_MAX_QUEUE"]))
        streams = [Stream(url, key, max_tokens=2000) for _ in range(count)]
        threads = [threading.Thread(target=s.run, daemon=True) for s in streams]
        for thread in threads:
            thread.start()
        wait_for(lambda: in_engine(url) == count or not hook.is_alive(), 60,
                 f"{count} requests in the engine")
        admitted = in_engine(url)
        hook.join()
        still_running = sum(s.ended_at is None for s in streams)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        readiness: list[tuple[float, int]] = []  # (seconds after SIGTERM, /readyz status)
        while process.poll() is None and time.monotonic() - signalled < 5:
            try:
                readiness.append((time.monotonic() - signalled, get_status(url + "/readyz")))
            except OSError:
                break
            time.sleep(0.2)
        code = process.wait(timeout=max(grace - (time.monotonic() - stopping), 1))
        exited = time.monotonic()
        for thread in threads:
            thread.join(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        redis.terminate()
        redis.wait(10)

    text = log.read_text()
    assert code == 0, text[-4000:]
    assert exited - stopping <= grace, (exited - stopping, grace)
    assert admitted == count, f"{admitted}/{count} requests reached the engine during preStop"
    # in flight at SIGTERM: at least every queued request (running ones may have ended)
    assert still_running >= count - rows, (still_running, count)
    # readiness turns 503 as soon as the signal is handled, and stays so
    first_503 = next((at for at, status in readiness if status == 503), None)
    assert first_503 is not None and first_503 < 2, readiness
    assert all(status == 503 for at, status in readiness if at >= first_503), readiness
    errors = [s.error for s in streams if s.error]
    assert not errors, errors
    reasons = [s.finish_reason() for s in streams]
    assert all(r in FINISH_REASONS for r in reasons), reasons
    assert all(s.ended_at is not None and s.ended_at <= exited + 1 for s in streams)
    finished = sorted({str(r) for r in reasons})
    sys.stderr.write(f"{overlay}: {still_running}/{count} streams in flight at SIGTERM, "
                     f"finish reasons {finished}, exit {exited - stopping:.1f} s after "
                     f"preStop began (grace {grace} s)\n")
