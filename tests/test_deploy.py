"""deploy/ and the Dockerfile: every manifest parses, the probes point at routes the app
really serves, the Redis runs with AOF and never evicts, and names line up across files."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tessera.engine.settings import EngineSettings
from tessera.server.app import create_app
from tessera.server.runner import FLUSH_GRACE_S
from tessera.server.server_settings import ServerSettings
from tessera.store.settings import StoreSettings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))


def load(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc]


def one(kind: str) -> dict[str, Any]:
    found = [d for path in MANIFESTS for d in load(path.name) if d.get("kind") == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def app_paths() -> set[str]:
    settings = ServerSettings.model_construct(
        admin_key=None, max_upload_bytes=1 << 20, max_archive_bytes=1 << 20,
        base_alias="base", engine=EngineSettings.model_construct(),
        store=StoreSettings.model_construct())
    return set(create_app(settings).openapi()["paths"])  # every route the app serves


def test_manifests_parse() -> None:
    assert {p.name for p in MANIFESTS} >= {"namespace.yaml", "tessera.yaml", "redis.yaml",
                                           "configmap.yaml", "secret.example.yaml",
                                           "monitoring.yaml", "kustomization.yaml"}
    for path in MANIFESTS:
        docs = load(path.name)
        assert docs, path
        for doc in docs:
            assert {"apiVersion", "kind"} <= doc.keys(), path
            if doc["kind"] not in ("Namespace", "Kustomization"):
                assert doc["metadata"]["namespace"] == "tessera", (path, doc["kind"])
    listed = set(load("kustomization.yaml")[0]["resources"])
    assert listed <= {p.name for p in MANIFESTS}
    assert "secret.example.yaml" not in listed  # a template, never applied as is


def test_deployment_probes_gpu_and_drain() -> None:
    deployment = one("Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    paths = app_paths()
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in paths, (probe, get["path"])
        assert get["port"] in port_names
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["args"][0] == "serve" and "8000" in container["args"]
    assert port_names["http"] == 8000
    # SIGTERM drain: the grace period covers preStop + engine drain + the flush grace
    config = load("configmap.yaml")[0]["data"]
    drain = float(config["TESSERA_DRAIN_TIMEOUT_S"])
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > (float(pre_stop[1]) + drain
                                                   + FLUSH_GRACE_S)
    assert config["TESSERA_API_DOCS"] == "false"  # no interactive docs in production
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/port"] == str(port_names["http"])
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_settings_come_from_configmap_and_secret() -> None:
    container = one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    secret = load("secret.example.yaml")[0]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    for name in ("TESSERA_STORE_REDIS_URL", "TESSERA_ADMIN_KEY"):
        assert env[name]["name"] == secret["metadata"]["name"]
        assert env[name]["key"] in secret["stringData"]
    assert container["envFrom"][0]["configMapRef"]["name"] == \
        load("configmap.yaml")[0]["metadata"]["name"]
    # every TESSERA_* key of the ConfigMap is a real setting (a typo would be ignored)
    fields = ({f"TESSERA_{f.upper()}" for f in EngineSettings.model_fields}
              | {f"TESSERA_{f.upper()}" for f in ServerSettings.model_fields}
              | {f"TESSERA_STORE_{f.upper()}" for f in StoreSettings.model_fields})
    assert set(load("configmap.yaml")[0]["data"]) <= fields
    # the Redis URL names the Redis Service
    redis_service = next(d for d in load("redis.yaml") if d["kind"] == "Service")
    host = re.match(r"redis://:[^@]+@([^:/]+)", secret["stringData"]["TESSERA_STORE_REDIS_URL"])
    assert host is not None and host.group(1) == redis_service["metadata"]["name"]


def test_redis_is_durable_and_never_evicts() -> None:
    docs = {d["kind"]: d for d in load("redis.yaml")}
    conf = dict(line.split(None, 1) for line in
                docs["ConfigMap"]["data"]["redis.conf"].splitlines() if line.strip())
    assert conf["appendonly"] == "yes"
    assert conf["appendfsync"] == "everysec"
    assert conf["maxmemory-policy"] == "noeviction"
    stateful = docs["StatefulSet"]
    claim = stateful["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"]
    (container,) = stateful["spec"]["template"]["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == conf["dir"]  # AOF lands on the PVC
    assert "/etc/redis/redis.conf" in container["command"]
    assert stateful["spec"]["serviceName"] == docs["Service"]["metadata"]["name"]


def test_service_and_monitor_select_the_pods() -> None:
    deployment = one("Deployment")
    services = [d for path in MANIFESTS for d in load(path.name)
                if d.get("kind") == "Service" and d["metadata"]["name"] == "tessera"]
    (service,) = services
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    monitor = one("ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == "http"


@pytest.mark.parametrize("instruction", ["FROM python:3.11-slim", "EXPOSE 8000", "USER "])
def test_dockerfile(instruction: str) -> None:
    assert instruction in (ROOT / "Dockerfile").read_text()


def test_dockerfile_pins_cpu_torch_and_checks_health() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"ARG TORCH_VERSION=2\.13\.0", text)
    assert "download.pytorch.org/whl/cpu" in text
    assert "/healthz" in text.split("HEALTHCHECK", 1)[1]
    assert shlex.split(text.split("ENTRYPOINT", 1)[1].splitlines()[0].strip(" []").replace(
        ",", " ")) == ["tessera"]
    user = re.search(r"^USER (\S+)", text, re.M)
    assert user is not None and user.group(1) not in ("root", "0")


def test_dockerfile_copies_every_package_it_installs() -> None:
    """The image installs the project from the copied folders: the ``tessera`` namespace
    pyproject.toml ships and every folder its links point at are copied, and modules the
    build imports exist."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    found = project["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = {p.split(".")[0] for p in found}
    assert shipped == {"tessera"}, shipped
    linked = {link.resolve().name for link in (ROOT / "tessera").iterdir() if link.is_symlink()}
    assert {"adapters", "store", "engine", "server"} <= linked, linked
    copied = set(re.findall(r"^COPY (\w+) \./\1$", dockerfile, flags=re.MULTILINE))
    assert shipped | linked <= copied, (shipped | linked, copied)
    for package, module in re.findall(r"from tessera\.(\w+) import (\w+)", dockerfile):
        assert (ROOT / package / f"{module}.py").is_file(), (package, module)
    assert "from tessera.engine import builtin" in dockerfile  # the image bakes the built-in model
