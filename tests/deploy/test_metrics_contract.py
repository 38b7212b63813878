"""The app's real /metrics against what reads it: every metric and label the alert rules,
the ScaledObject and the endpoint picker read is a series the app exposes (with the labels
and outcome values it uses), and the queue alert tracks the configured queue bound."""

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
from prometheus_client.parser import text_string_to_metric_families

from tessera.server.metrics import OUTCOMES
from tests.deploy.manifests import OVERLAYS, config_map, find, one, render, tessera_container
from tests.live import HermeticServerSettings, HermeticSettings, HermeticStoreSettings, LiveServer

# Series the rules read that come from elsewhere: Prometheus itself, kube-state-metrics.
EXTERNAL_SERIES = {"up", "kube_statefulset_status_replicas_ready"}
# Labels Prometheus attaches to every scraped series (target labels), not the app.
TARGET_LABELS = {"job", "namespace", "pod", "instance", "service", "container", "endpoint"}


# --- the app's side --------------------------------------------------------------------------
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


