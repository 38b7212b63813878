"""The manifests against the app they deploy: every probe path is a route the app serves,
ports line up, every environment variable is a setting the app reads (and the overlays'
values validate), every Secret key exists, and the grace period covers the drain.

The app's /metrics against what reads it: ``test_metrics_contract.py``; the pods and the
image on their own: ``test_workloads.py``."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from tessera.engine.settings import EngineSettings
from tessera.server import cli
from tessera.server.app import create_app
from tessera.server.metrics import MetricsSettings
from tessera.server.runner import FLUSH_GRACE_S
from tessera.server.server_settings import ServerSettings
from tessera.store.settings import StoreSettings
from tests.deploy.manifests import (
    OVERLAYS,
    SECRET,
    config_map,
    env_of,
    final_image_env,
    find,
    one,
    pod_specs,
    render,
    tessera_container,
)

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

