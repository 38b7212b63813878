"""The manifests against the app they deploy: every probe path is a route the app serves,
ports line up, every environment variable is a setting the app reads (and the overlays'
values validate), every Secret key exists, every metric and label the alert rules, the
ScaledObject and the endpoint picker read is in the app's real /metrics; the grace period
covers the drain, Redis has room for its AOF rewrite, every pod meets Pod Security
"restricted", and the image agrees with the pods that run it."""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tessera.engine.settings import EngineSettings
from tessera.server import cli
from tessera.server.app import create_app
from tessera.server.metrics import OUTCOMES, MetricsSettings
from tessera.server.runner import FLUSH_GRACE_S
from tessera.server.server_settings import ServerSettings
from tessera.store.settings import StoreSettings
from tests.deploy.manifests import (
    DEPLOY,
    OVERLAYS,
    Doc,
    config_map,
    dockerfile_stages,
    env_of,
    final_image_env,
    find,
    memory_bytes,
    one,
    pod_specs,
    render,
    tessera_container,
)
from tests.live import HermeticServerSettings, HermeticSettings, HermeticStoreSettings, LiveServer

SECRET = next(yaml.safe_load_all((DEPLOY / "base" / "secret.example.yaml").read_text()))
# Series the rules read that come from elsewhere: Prometheus itself, kube-state-metrics.
EXTERNAL_SERIES = {"up", "kube_statefulset_status_replicas_ready"}
# Labels Prometheus attaches to every scraped series (target labels), not the app.
TARGET_LABELS = {"job", "namespace", "pod", "instance", "service", "container", "endpoint"}
# Variables of the tessera container that are not tessera settings, and what reads them.
THIRD_PARTY_ENV = {"PATH", "HOME", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "HF_HOME",
                   "NVIDIA_DRIVER_CAPABILITIES"}
SHUTDOWN_MARGIN_S = 10  # closing the store and exiting, on top of drain + flush


# --- the app's side --------------------------------------------------------------------------
def setting_names() -> set[str]:
    """Every environment variable the server reads (pydantic settings and the CLI)."""
    names = ({f"TESSERA_{f.upper()}" for f in EngineSettings.model_fields}
             | {f"TESSERA_{f.upper()}" for f in ServerSettings.model_fields
                if f not in ("engine", "store")}
             | {f"TESSERA_STORE_{f.upper()}" for f in StoreSettings.model_fields}
             | {f"TESSERA_METRICS_{f.upper()}" for f in MetricsSettings.model_fields})
    return names | cli_env_names()


def cli_env_names() -> set[str]:
    """The `serve` flags whose default comes from the environment, found by setting each
    candidate and seeing the parsed default change."""
    found = set()
    values = {"TESSERA_HOST": "10.1.2.3", "TESSERA_PORT": "8123", "TESSERA_LOG_LEVEL": "debug",
              "TESSERA_LOG_FORMAT": "text"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in values.items():
            patch.setenv(name, value)
        args = vars(cli.build_parser().parse_args(["serve"]))
    for name, value in values.items():
        if str(args[name.removeprefix("TESSERA_").lower()]) == value:
            found.add(name)
    return found


class Routes:
    """GET paths the app serves, asked of the app itself (no lifespan: a route that needs
    the engine answers 500/503 here, an unknown path 404)."""

    def __init__(self) -> None:
        settings = ServerSettings.model_construct(
            admin_key=None, max_upload_bytes=1 << 20, max_archive_bytes=1 << 20,
            max_request_bytes=1 << 20, api_docs=False, base_alias="base",
            engine=EngineSettings.model_construct(), store=StoreSettings.model_construct())
        self.client = TestClient(create_app(settings), raise_server_exceptions=False)

    def __contains__(self, path: object) -> bool:
        return self.client.get(str(path)).status_code not in (404, 405)


def app_routes() -> Routes:
    routes = Routes()
    assert "/no-such-path" not in routes
    return routes


@pytest.fixture(scope="module")
def exposition(builtin_dir: Path) -> Iterator[str]:
    """The real /metrics of the app (built-in model, embedded redis-server) after one
    completion, so labelled series exist."""
    root = Path(tempfile.mkdtemp(prefix="tdm", dir="/tmp"))  # short: redis socket path
    settings = HermeticServerSettings(
        admin_key="admin-key", engine=HermeticSettings(builtin_dir=builtin_dir, device="cpu"),
        store=HermeticStoreSettings(data_dir=root / "redis"))
    try:
        with LiveServer(settings) as server:
            def call(path: str, body: dict[str, Any], key: str) -> Any:
                request = urllib.request.Request(
                    server.url + path, data=json.dumps(body).encode(), headers={
                        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=60) as response:
                    return json.loads(response.read())

            tenant = call("/v1/tenants", {"name": "acme"}, "admin-key")
            call("/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": 4},
                 tenant["api_key"])
            with urllib.request.urlopen(server.url + "/metrics", timeout=30) as response:
                yield response.read().decode()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample_labels(text: str) -> dict[str, set[str]]:
    """Sample name (tessera_requests_total, ..._bucket) -> label names seen on it."""
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


# --- what the manifests read -------------------------------------------------------------------
def promql_uses(overlay: str) -> list[tuple[str, str]]:
    """(where, PromQL) of every query in the overlay: alert rules and KEDA triggers."""
    docs = render(overlay)
    uses = []
    for rule_doc in find(docs, "PrometheusRule"):
        for group in rule_doc["spec"]["groups"]:
            for rule in group["rules"]:
                uses.append((rule.get("alert", rule.get("record", "")), rule["expr"]))
    for scaled in find(docs, "ScaledObject"):
        for trigger in scaled["spec"]["triggers"]:
            uses.append((f"ScaledObject {trigger.get('name')}", trigger["metadata"]["query"]))
    return uses


def picker_metrics(overlay: str) -> dict[str, str]:
    """The endpoint picker's --*-metric flags (flag -> metric spec)."""
    out = {}
    for deployment in find(render(overlay), "Deployment", "tessera-epp"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            for arg in container.get("args", []):
                flag, _, value = arg.partition("=")
                if flag.endswith("-metric"):
                    out[flag] = value
    return out


PROMQL_WORDS = {"sum", "max", "min", "avg", "count", "by", "without", "on", "ignoring", "or",
                "and", "unless", "rate", "increase", "irate", "histogram_quantile", "absent",
                "group_left", "group_right", "bool", "offset", "topk", "bottomk"}
NAME = re.compile(r"(?<![\w:])([A-Za-z_:][A-Za-z0-9_:]*)(?![\w:])\s*(\{[^}]*\})?")


def series_in(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(metric name, label matchers) of every selector in a PromQL expression."""
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    out = []
    for match in NAME.finditer(text):
        name = match.group(1)
        if name in PROMQL_WORDS or text[match.end():].lstrip().startswith("("):
            continue  # a keyword or a function call
        labels = dict(re.findall(r'(\w+)\s*=~?\s*"([^"]*)"', match.group(2) or ""))
        out.append((name, labels))
    return out


def test_series_parser() -> None:
    expr = ('histogram_quantile(0.95, sum by (namespace, le) (rate(tessera_x_bucket{job="t", '
            'outcome="error"}[5m]))) > 10 or on () (max(kube_y{a="b"}) == 0)')
    assert series_in(expr) == [("tessera_x_bucket", {"job": "t", "outcome": "error"}),
                               ("kube_y", {"a": "b"})]


# --- tests ---------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_ports_match_the_app(overlay: str) -> None:
    docs = render(overlay)
    routes = app_routes()
    container = tessera_container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    image_env = final_image_env()
    env = {**image_env, **env_of(docs, container)}
    assert ports == {"http": int(str(env["TESSERA_PORT"]))}  # the port tessera binds
    # no Service links: the Service `tessera` would set TESSERA_PORT=tcp://<ip>:80
    assert one(docs, "Deployment", "tessera")["spec"]["template"]["spec"][
        "enableServiceLinks"] is False
    assert env["TESSERA_HOST"] == "0.0.0.0"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in routes, (probe, get["path"])
        assert get["port"] in ports, (probe, get["port"])
    template = one(docs, "Deployment", "tessera")["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics" and "/metrics" in routes
    assert annotations["prometheus.io/port"] == str(ports["http"])
    service = one(docs, "Service", "tessera")
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    for monitor in find(docs, "ServiceMonitor"):
        assert monitor["spec"]["selector"]["matchLabels"].items() <= \
            service["metadata"]["labels"].items()
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
            assert endpoint["path"] in routes
    for pool in find(docs, "InferencePool"):
        assert [p["number"] for p in pool["spec"]["targetPorts"]] == [ports["http"]]
        assert pool["spec"]["selector"]["matchLabels"].items() <= \
            template["metadata"]["labels"].items()
        picker = one(docs, "Deployment", pool["spec"]["endpointPickerRef"]["name"])
        picker_labels = picker["spec"]["template"]["metadata"]["labels"]
        assert not pool["spec"]["selector"]["matchLabels"].items() <= picker_labels.items()
        picker_service = one(docs, "Service", pool["spec"]["endpointPickerRef"]["name"])
        assert pool["spec"]["endpointPickerRef"]["port"]["number"] in \
            {p["port"] for p in picker_service["spec"]["ports"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_environment_is_real_settings_with_valid_values(overlay: str,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    docs = render(overlay)
    container = tessera_container(docs)
    env = {**final_image_env(), **env_of(docs, container)}
    known = setting_names()
    for name in env:
        assert name in known or name in THIRD_PARTY_ENV, f"{name} is read by nothing"
    for name in list(env):
        if name.startswith("TESSERA_"):
            monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        if name.startswith("TESSERA_") and name not in cli_env_names():
            monkeypatch.setenv(name, value if value is not None else "redis://:x@redis:6379/0")
    settings = ServerSettings()  # what `tessera serve` builds from this environment
    config = config_map(docs, container["envFrom"][0]["configMapRef"]["name"])
    assert settings.engine.drain_timeout_s == float(config["TESSERA_DRAIN_TIMEOUT_S"])
    assert settings.api_docs is False
    assert settings.admin_key is not None and settings.store.redis_url is not None
    parsed = cli.build_parser().parse_args(["serve", "--log-format", env["TESSERA_LOG_FORMAT"]
                                            or "auto"])
    assert parsed.log_format == "json"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secret_references_exist(overlay: str) -> None:
    docs = render(overlay)
    keys = set(SECRET["stringData"])
    assert SECRET["metadata"]["name"] == "tessera-secrets"
    assert not find(docs, "Secret")  # never rendered: created by hand (docs/deploy.md)
    for _, pod in pod_specs(docs):
        for container in pod.get("initContainers", []) + pod["containers"]:
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "tessera-secrets" and ref["key"] in keys, ref
            joined = " ".join(container.get("command", []) + container.get("args", []))
            assert "PASSWORD" not in joined and "requirepass" not in joined.split("printf")[0]
        for volume in pod.get("volumes", []):
            secret = volume.get("secret")
            if secret:
                assert secret["secretName"] == "tessera-secrets"
                for item in secret.get("items", []):
                    assert item["key"] in keys or secret.get("optional"), item
    redis_url = SECRET["stringData"]["TESSERA_STORE_REDIS_URL"]
    match = re.fullmatch(r"redis://:([^@]+)@([^:/]+):(\d+)/0", redis_url)
    assert match is not None and match.group(1) == SECRET["stringData"]["REDIS_PASSWORD"]
    redis_service = one(docs, "Service", match.group(2))
    assert int(match.group(3)) in {p["port"] for p in redis_service["spec"]["ports"]}


def test_metric_names_and_labels_exist_in_the_app(exposition: str) -> None:
    samples = sample_labels(exposition)
    checked = set()
    for overlay in OVERLAYS:
        for where, expr in promql_uses(overlay):
            for name, matchers in series_in(expr):
                checked.add(name)
                if name in EXTERNAL_SERIES:
                    continue
                assert name in samples, f"{where}: {name} is not in the app's /metrics"
                assert set(matchers) - TARGET_LABELS <= samples[name], (where, name, matchers)
                if "outcome" in matchers:
                    assert matchers["outcome"] in OUTCOMES, (where, matchers)
    assert {"tessera:num_requests_waiting", "tessera_requests_total",
            "tessera_slot_load_failures_total", "tessera_store_available",
            "tessera_request_queue_time_seconds_bucket"} <= checked


def test_endpoint_picker_reads_the_router_series(exposition: str) -> None:
    found = families(exposition)
    flags = picker_metrics("gpu-prod-routed")
    assert set(flags) >= {"--total-queued-requests-metric", "--total-running-requests-metric",
                          "--kv-cache-usage-percentage-metric", "--lora-info-metric"}
    for flag, spec in flags.items():
        if not spec:
            continue  # switched off
        name = spec.split("{", 1)[0]
        assert name in found, f"{flag}: {name} is not in the app's /metrics"
        assert found[name].type == "gauge", (flag, found[name].type)
    lora = found[flags["--lora-info-metric"]]
    (sample,) = lora.samples
    assert set(sample.labels) == {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}
    assert int(sample.labels["max_lora"]) >= 1
    usage = found[flags["--kv-cache-usage-percentage-metric"]].samples[0].value
    assert 0.0 <= usage <= 1.0


def test_queue_alert_tracks_the_queue_bound() -> None:
    docs = render("gpu-prod")
    config = config_map(docs, tessera_container(docs)["envFrom"][0]["configMapRef"]["name"])
    (rule,) = [r for g in one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]
               if r["alert"] == "TesseraQueueSaturated"]
    threshold = float(rule["expr"].rsplit(">", 1)[1])
    assert threshold == math.floor(0.8 * int(config["TESSERA_MAX_QUEUE"]))
    assert "tessera:num_requests_waiting" in rule["expr"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_prestop_drain_and_flush(overlay: str) -> None:
    docs = render(overlay)
    container = tessera_container(docs)
    pod = one(docs, "Deployment", "tessera")["spec"]["template"]["spec"]
    config = config_map(docs, container["envFrom"][0]["configMapRef"]["name"])
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    needed = float(command[1]) + float(config["TESSERA_DRAIN_TIMEOUT_S"]) + FLUSH_GRACE_S
    grace = pod["terminationGracePeriodSeconds"]
    # covers the worst case with room to close the store, and not so much more that a
    # hung process holds a GPU for long
    assert needed + SHUTDOWN_MARGIN_S <= grace <= needed + 30, (needed, grace)
    for picker in find(docs, "Deployment", "tessera-epp"):
        assert picker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= grace


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_is_durable_private_and_has_room_to_rewrite(overlay: str) -> None:
    docs = render(overlay)
    stateful = one(docs, "StatefulSet", "tessera-redis")
    pod = stateful["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config_name = next(v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v)
    files = config_map(docs, config_name)
    conf: dict[str, str] = {}
    for text in (files["redis.conf"], files["memory.conf"]):
        for line in text.splitlines():
            if line.strip() and not line.startswith("#"):
                key, _, value = line.partition(" ")
                conf[key] = value.strip()
    assert conf["appendonly"] == "yes" and conf["appendfsync"] == "everysec"
    assert conf["save"] == '""' and conf["maxmemory-policy"] == "noeviction"
    assert conf["include"] == "/etc/redis/memory.conf"
    maxmemory = memory_bytes(conf["maxmemory"])
    limit = memory_bytes(container["resources"]["limits"]["memory"])
    assert limit >= 2 * maxmemory + 2**30, (maxmemory, limit)  # the AOF rewrite forks
    assert container["resources"]["requests"]["memory"] == \
        container["resources"]["limits"]["memory"]  # never the first pod the node kills
    claim = stateful["spec"]["volumeClaimTemplates"][0]
    assert memory_bytes(claim["spec"]["resources"]["requests"]["storage"]) >= 2.5 * maxmemory
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[conf["dir"]] == claim["metadata"]["name"]  # the AOF lands on the PVC
    assert container["command"] == ["redis-server", "/run/redis/redis.conf"]
    assert "env" not in container  # the password is a file, not a variable
    (init,) = pod["initContainers"]
    assert "requirepass" in init["command"][-1] and "/run/secrets/redis/password" in \
        init["command"][-1]
    assert "@sha256:" in container["image"] and container["image"] == init["image"]
    # only tessera reaches it
    (policy,) = [p for p in find(docs, "NetworkPolicy")
                 if p["spec"]["podSelector"].get("matchLabels") ==
                 {"app.kubernetes.io/name": "tessera-redis"}]
    sources = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    assert sources == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "tessera"}}}]
    assert policy["spec"]["egress"] == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_pod_security_restricted(overlay: str) -> None:
    docs = render(overlay)
    (namespace,) = find(docs, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    policies = find(docs, "NetworkPolicy")
    assert any(p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) ==
               {"Ingress", "Egress"} for p in policies)  # default deny
    for doc, pod in pod_specs(docs):
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True, where
        assert context["seccompProfile"]["type"] == "RuntimeDefault", where
        assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod), where
        for volume in pod.get("volumes", []):
            assert "hostPath" not in volume, where
        labels = pod_labels(doc)
        assert any(p["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()
                   and p["spec"]["podSelector"] for p in policies), f"{where}: no policy"
        for container in pod.get("initContainers", []) + pod["containers"]:
            at = f"{where}/{container['name']}"
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, at
            assert security["capabilities"]["drop"] == ["ALL"], at
            assert not security["capabilities"].get("add"), at
            assert security["readOnlyRootFilesystem"] is True, at
            assert security.get("privileged") is not True, at
            uid = security.get("runAsUser", context.get("runAsUser"))
            assert uid is None or uid >= 10000, at
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory", "ephemeral-storage"} <= set(resources[kind]), at
            for probe in ("readinessProbe", "livenessProbe"):
                if doc["kind"] != "Job" and container in pod["containers"]:
                    assert probe in container, at


def pod_labels(doc: Doc) -> dict[str, str]:
    labels: dict[str, str] = doc["spec"]["template"]["metadata"]["labels"]
    return labels


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_image_and_pod_agree(overlay: str) -> None:
    docs = render(overlay)
    final = dockerfile_stages()[-1]
    (user,) = [args for instruction, args in final.instructions if instruction == "USER"]
    uid, _, gid = user.partition(":")
    pod = one(docs, "Deployment", "tessera")["spec"]["template"]["spec"]
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == \
        (int(uid), int(gid))
    container = tessera_container(docs)
    assert "command" not in container and "args" not in container  # the image's `tessera serve`
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    (volumes,) = [json.loads(a) for i, a in final.instructions if i == "VOLUME"]
    env = final_image_env()
    assert "/data" in mounts and "/tmp" in mounts  # writable places on a read-only root
    assert set(volumes) <= mounts | {"/models"}
    for name in ("HOME", "HF_HOME", "TESSERA_STORE_DATA_DIR"):
        assert any(env[name].startswith(m + "/") for m in mounts), name


def test_gpu_prod_shape() -> None:
    docs = render("gpu-prod")
    deployment = one(docs, "Deployment", "tessera")
    pod = deployment["spec"]["template"]["spec"]
    container = tessera_container(docs)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        pod["tolerations"]
    assert pod["affinity"]["podAntiAffinity"] and pod["topologySpreadConstraints"]
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # model loading
    env = env_of(docs, container)
    assert env["TESSERA_DEVICE"] == "cuda" and str(env["TESSERA_MODEL"]).startswith("/models/")
    models = next(m for m in container["volumeMounts"] if m["mountPath"] == "/models")
    assert models["readOnly"] is True
    claim = next(v for v in pod["volumes"] if v["name"] == models["name"])
    pvc = one(docs, "PersistentVolumeClaim", claim["persistentVolumeClaim"]["claimName"])
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    # the replica waits for the marker the fetch Job writes last
    (wait,) = pod["initContainers"]
    job = one(docs, "Job", "tessera-model-fetch")
    script = job["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert ".tessera-complete" in wait["command"][-1] and '".tessera-complete"' in script
    assert "os.replace(tmp, dest)" in script
    # KEDA owns the replica count
    assert "replicas" not in deployment["spec"]
    scaled = one(docs, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "tessera"
    assert scaled["spec"]["minReplicaCount"] >= 2
    assert one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_cpu_dev_shape() -> None:
    docs = render("cpu-dev")
    deployment = one(docs, "Deployment", "tessera")
    assert deployment["spec"]["replicas"] == 1
    assert "nvidia.com/gpu" not in tessera_container(docs)["resources"]["limits"]
    assert not find(docs, "PodDisruptionBudget")  # one replica: it would block drains
    env = env_of(docs, tessera_container(docs))
    assert env["TESSERA_DEVICE"] == "cpu" and "TESSERA_MODEL" not in env  # built-in model
    assert not {"ServiceMonitor", "ScaledObject", "InferencePool"} & {d["kind"] for d in docs}
