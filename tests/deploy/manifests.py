"""What tests/deploy reads: the pinned tools, the rendered overlays, the Dockerfile.

The tools come from the deploy-tools venv that ``scripts/lint-deploy --install`` fills
(``scripts/test`` runs it), never from PATH, so the versions are the pinned ones. A missing
tool fails the test (never a skip), naming the command that installs it.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = sorted(p.parent.name for p in (DEPLOY / "overlays").glob("*/kustomization.yaml"))
# The Kubernetes versions every rendered object is validated against (strict schemas of
# kubernetes-validate): the oldest supported (also the namespace's Pod Security version)
# and the newest the pinned validator knows.
KUBERNETES_VERSIONS = ("1.33.0", "1.37.0")

Doc = dict[str, Any]

# The Secret the manifests reference: created by hand from this example (docs/deploy.md),
# never rendered.
SECRET: Doc = next(yaml.safe_load_all((DEPLOY / "base" / "secret.example.yaml").read_text()))


def tools_dir() -> Path:
    configured = os.environ.get("TESSERA_DEPLOY_TOOLS")  # as scripts/lint-deploy reads it
    return ROOT / configured if configured else Path(sys.prefix) / "deploy-tools"


def tool(name: str) -> str:
    path = tools_dir() / "bin" / name
    if not os.access(path, os.X_OK):
        message = (f"{name} is not installed in {tools_dir()}: run scripts/lint-deploy "
                   "--install (scripts/test does)")
        pytest.fail(message)
    return str(path)


def run(argv: list[str], *, timeout: float = 300, **kwargs: Any
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          **kwargs)


@functools.cache
def rendered_text(overlay: str) -> str:
    done = run([tool("kubectl"), "kustomize", str(DEPLOY / "overlays" / overlay)])
    assert done.returncode == 0, done.stderr
    return done.stdout


def render(overlay: str) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(rendered_text(overlay)) if doc]


def find(docs: list[Doc], kind: str, name: str | None = None) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind
            and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = find(docs, kind, name)
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def pod_specs(docs: list[Doc]) -> list[tuple[Doc, Doc]]:
    """(object, pod spec) of every workload."""
    out = []
    for doc in docs:
        spec = doc.get("spec", {})
        if doc["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
            out.append((doc, spec["template"]["spec"]))
    return out


def tessera_container(docs: list[Doc]) -> Doc:
    pod = one(docs, "Deployment", "tessera")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "tessera")


def config_map(docs: list[Doc], ref: str) -> dict[str, str]:
    data: dict[str, str] = one(docs, "ConfigMap", ref)["data"]
    return data


def env_of(docs: list[Doc], container: Doc) -> dict[str, str | None]:
    """The container's environment as the kubelet builds it: envFrom ConfigMaps first,
    then env (values; None for a Secret reference)."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        env.update(config_map(docs, source["configMapRef"]["name"]))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "configMapKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = config_map(docs, ref["name"])[ref["key"]]
        else:
            env[var["name"]] = None
    return env


def memory_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (10Gi, 1536Mi, 512M) or a Redis one (4gb, 256mb)."""
    match = re.fullmatch(r"(\d+)\s*([A-Za-z]*)", quantity.strip())
    assert match, quantity
    units = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20,
             "gi": 2**30, "ti": 2**40, "kb": 2**10, "mb": 2**20, "gb": 2**30}
    return int(match.group(1)) * units[match.group(2).lower()]


# --- the Dockerfile ------------------------------------------------------------------------
@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def dockerfile_stages(text: str | None = None) -> list[Stage]:
    text = text if text is not None else (ROOT / "Dockerfile").read_text()
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    stages: list[Stage] = []
    for line in logical:
        instruction, _, args = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif stages:
            stages[-1].instructions.append((instruction.upper(), args.strip()))
    return stages


def final_image_env() -> dict[str, str]:
    """ENV of the image's last stage, following FROM <stage> back to the base image."""
    stages = dockerfile_stages()
    by_name = {s.name: s for s in stages if s.name}
    chain = [stages[-1]]
    while chain[-1].base in by_name:
        chain.append(by_name[chain[-1].base])
    env: dict[str, str] = {}
    for stage in reversed(chain):
        for instruction, args in stage.instructions:
            if instruction == "ENV":
                for token in shlex.split(args):
                    key, _, value = token.partition("=")
                    env[key] = value
    return env


def exec_form(stage: Stage, instruction: str) -> list[str]:
    (args,) = [a for i, a in stage.instructions if i == instruction]
    value = yaml.safe_load(args)  # exec form is a JSON array
    assert isinstance(value, list), (instruction, args)
    return [str(v) for v in value]
