"""Strict JSON Schemas for the custom resources deploy/ uses, made from the CRDs' own
OpenAPI schemas (kubernetes-validate knows only the built-in kinds).

The schemas are vendored in deploy/lint/crd-schemas/ (no network at test time).
Regenerate them from the upstream CRD files (the sources are recorded in each file):

    python -m tests.deploy.crd SOURCE_LABEL path/to/crd.yaml [...]

The conversion is the API server's structural-schema rules, as JSON Schema: an object
with ``properties`` accepts no other field unless ``x-kubernetes-preserve-unknown-fields``;
``x-kubernetes-int-or-string`` is an integer or a string; ``nullable`` admits null.
Descriptions, defaults and CEL rules (``x-kubernetes-validations``) are dropped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

SCHEMAS = Path(__file__).resolve().parents[2] / "deploy" / "lint" / "crd-schemas"
_DROPPED = {"description", "default", "example", "format", "x-kubernetes-validations",
            "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type",
            "x-kubernetes-embedded-resource"}


def strict(node: dict[str, Any]) -> dict[str, Any]:
    """One OpenAPI v3 (structural) schema node -> a strict JSON Schema node."""
    if node.get("x-kubernetes-int-or-string"):
        return {"anyOf": [{"type": "integer"}, {"type": "string"}]}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED or key in ("nullable", "x-kubernetes-preserve-unknown-fields"):
            continue
        if key == "properties":
            out[key] = {name: strict(sub) for name, sub in value.items()}
        elif key in ("items", "not") or (key == "additionalProperties"
                                         and isinstance(value, dict)):
            out[key] = strict(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [strict(sub) for sub in value]
        else:
            out[key] = value
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def schema_file(api_version: str, kind: str) -> Path:
    return SCHEMAS / f"{kind.lower()}_{api_version.replace('/', '_')}.json"


def load(api_version: str, kind: str) -> dict[str, Any] | None:
    path = schema_file(api_version, kind)
    return json.loads(path.read_text()) if path.is_file() else None


def generate(source: str, crd_path: Path) -> list[Path]:
    written = []
    for crd in yaml.safe_load_all(crd_path.read_text()):
        if not crd or crd.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("served", True) or version.get("deprecated"):
                continue
            schema = strict(version["schema"]["openAPIV3Schema"])
            schema["$comment"] = f"{kind} {group}/{version['name']} from {source}"
            schema["properties"]["metadata"] = {"type": "object"}
            path = schema_file(f"{group}/{version['name']}", kind)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")
            written.append(path)
    return written


if __name__ == "__main__":
    label, *files = sys.argv[1:]
    for file in files:
        for path in generate(label, Path(file)):
            sys.stdout.write(f"{path}\n")
