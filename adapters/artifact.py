"""tessera's own artifact format: a JSON manifest plus one safetensors file.

Adapter artifact (any registered method, or a composite adapter such as a HyperLoader
task's LoRA + bottleneck)::

    manifest.json        {"format": "tessera.adapter", "version": 1,
                          "components": [{"method": "lora", "prefix": "lora.",
                                          "config": {...},
                                          "modules": {"<module path>": ["lora_A", "lora_B"]}}],
                          "metadata": {"<str>": "<str>"}}            # metadata optional
    weights.safetensors  keys "<prefix><module path>.<tensor name>"

Hypernetwork artifact (config + weights + registered task embeddings)::

    manifest.json        {"format": "tessera.hypernetwork", "version": 1,
                          "generator": "hyperloader", "config": {...},
                          "tasks": ["<task name>", ...], "metadata": {...}}
    weights.safetensors  keys "hypernet.<weight name>" and "task.<task name>"

Parsing is strict: unknown format/version, unknown manifest fields, unknown methods
(``UnknownMethodError``), invalid configs (``AdapterValidationError`` naming the field),
keys not claimed by a component, missing keys, non-float or non-finite tensors are all
refused. Weights are decoded only by :func:`tessera.adapters.safeio.read_safetensors`. A round trip
is bit-exact (dtypes and values as stored). See ``docs/artifacts.md``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from tessera.adapters import registry
from tessera.adapters.errors import AdapterValidationError, UnsupportedAdapterError
from tessera.adapters.hypernet import HyperLoaderConfig, HyperNetwork, base_schema, head_names
from tessera.adapters.method import Adapter, Component, Limits
from tessera.adapters.methods.hyperloader import HyperLoader
from tessera.adapters.pool import parts_by_module
from tessera.adapters.safeio import read_safetensors, write_safetensors
from tessera.adapters.targets import TargetInfo
from tessera.adapters.validation import FLOAT_DTYPES, validate_component

ADAPTER_FORMAT = "tessera.adapter"
HYPERNET_FORMAT = "tessera.hypernetwork"
VERSIONS = (1,)
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"
_PREFIX = re.compile(r"(?:[A-Za-z0-9_-]+\.)?")  # "" or one segment ending in "."
_PATH = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
_TENSOR = re.compile(r"[A-Za-z0-9_-]+")  # no dots: a key splits unambiguously


@dataclass(frozen=True)
class Artifact:
    adapter: Adapter
    metadata: dict[str, str] = field(default_factory=dict)


# --- writing --------------------------------------------------------------------------------
def _prefixes(adapter: Adapter) -> list[str]:
    methods = adapter.methods
    if len(set(methods)) == len(methods):
        return [f"{m}." for m in methods]
    return [f"{m}_{i}." for i, m in enumerate(methods)]


def _manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    # insertion order, not sorted: config dicts such as rank_pattern are ordered (first match)
    return json.dumps(manifest, indent=2, allow_nan=False).encode()


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    meta = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise AdapterValidationError("metadata must map strings to strings", tensor="metadata")
    return meta


def dumps(adapter: Adapter, metadata: Mapping[str, str] | None = None) -> tuple[bytes, bytes]:
    """``(manifest bytes, safetensors bytes)`` of an adapter."""
    if not adapter.components:
        raise AdapterValidationError("an adapter needs at least one component",
                                     tensor="components")
    components, tensors = [], {}
    for component, prefix in zip(adapter.components, _prefixes(adapter), strict=True):
        modules: dict[str, list[str]] = {}
        for path, module_tensors in component.modules.items():
            for name, tensor in module_tensors.items():
                if _PATH.fullmatch(path) is None or _TENSOR.fullmatch(name) is None:
                    raise AdapterValidationError("module path or tensor name cannot be "
                                                 "written as an artifact key",
                                                 tensor=f"{path}.{name}")
                tensors[f"{prefix}{path}.{name}"] = tensor
            modules[path] = list(module_tensors)
        components.append({"method": component.method, "prefix": prefix,
                           "config": component.config.model_dump(mode="json"),
                           "modules": modules})
    manifest: dict[str, Any] = {"format": ADAPTER_FORMAT, "version": VERSIONS[-1],
                                "components": components}
    meta = _check_metadata(metadata)
    if meta:
        manifest["metadata"] = meta
    return _manifest_bytes(manifest), write_safetensors(tensors)


def dumps_hypernetwork(hypernet: HyperNetwork, metadata: Mapping[str, str] | None = None
                       ) -> tuple[bytes, bytes]:
    """``(manifest bytes, safetensors bytes)`` of a hypernetwork and its tasks."""
    hypernet.check_weights()
    manifest: dict[str, Any] = {"format": HYPERNET_FORMAT, "version": VERSIONS[-1],
                                "generator": HyperLoader.name,
                                "config": hypernet.config.model_dump(mode="json"),
                                "tasks": list(hypernet.tasks)}
    meta = _check_metadata(metadata)
    if meta:
        manifest["metadata"] = meta
    tensors = {f"hypernet.{k}": v for k, v in hypernet.weights.items()}
    tensors.update({f"task.{k}": v for k, v in hypernet.tasks.items()})
    return _manifest_bytes(manifest), write_safetensors(tensors)


# --- strict parsing -----------------------------------------------------------------------
def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise AdapterValidationError(f"duplicate JSON key {key!r}", tensor="manifest")
    return dict(pairs)


def _no_constant(name: str) -> None:
    raise AdapterValidationError(f"JSON constant {name} is not allowed", tensor="manifest")


def _parse_json(data: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates,
                         parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterValidationError(f"manifest is not valid JSON: {exc}",
                                     tensor="manifest") from None
    if not isinstance(obj, dict):
        raise AdapterValidationError("manifest must be a JSON object", tensor="manifest")
    return obj


def _fields(obj: Any, where: str, required: set[str], optional: frozenset[str] = frozenset()
            ) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise AdapterValidationError("must be a JSON object", tensor=where)
    for key in obj:
        if key not in required | optional:
            raise AdapterValidationError(
                f"unknown field (expected {sorted(required | optional)})", tensor=f"{where}.{key}")
    for key in sorted(required):
        if key not in obj:
            raise AdapterValidationError("missing field", tensor=f"{where}.{key}")
    return obj


def _header(data: bytes, expected: str) -> dict[str, Any]:
    manifest = _parse_json(data)
    fmt, version = manifest.get("format"), manifest.get("version")
    if fmt != expected:
        raise AdapterValidationError(f"unknown artifact format {fmt!r} (expected {expected!r})",
                                     tensor="manifest.format")
    if type(version) is not int or version not in VERSIONS:
        raise AdapterValidationError(f"unsupported {expected} version {version!r} "
                                     f"(supported: {list(VERSIONS)})", tensor="manifest.version")
    return manifest


def _config(config_type: type[BaseModel], parse: Callable[[Mapping[str, Any]], Any], raw: Any,
            where: str) -> Any:
    if not isinstance(raw, dict):
        raise AdapterValidationError("must be a JSON object", tensor=where)
    try:
        return parse(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise AdapterValidationError(f"{err['msg']} ({config_type.__name__})",
                                     tensor=f"{where}.{loc}" if loc else where) from None


def _metadata(manifest: Mapping[str, Any]) -> dict[str, str]:
    raw = manifest.get("metadata", {})
    if not isinstance(raw, dict):
        raise AdapterValidationError("must be a JSON object", tensor="manifest.metadata")
    return _check_metadata(raw)


def _tensor_ok(key: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype not in FLOAT_DTYPES:
        raise AdapterValidationError(f"dtype {tensor.dtype} is not float32, float16 or "
                                     "bfloat16", tensor=key)
    if not bool(torch.isfinite(tensor).all()):
        raise AdapterValidationError("contains NaN or Inf values", tensor=key)
    return tensor


def _declared(raw: Any, where: str) -> dict[str, list[str]]:
    if not isinstance(raw, dict) or not raw:
        raise AdapterValidationError("must be a non-empty JSON object", tensor=where)
    for path, names in raw.items():
        if _PATH.fullmatch(path) is None:
            raise AdapterValidationError("not a module path", tensor=f"{where}.{path}")
        if (not isinstance(names, list) or not names or len(set(names)) != len(names)
                or not all(isinstance(n, str) and _TENSOR.fullmatch(n) for n in names)):
            raise AdapterValidationError("must be a non-empty list of distinct tensor names",
                                         tensor=f"{where}.{path}")
    return raw


def loads_artifact(manifest_bytes: bytes, weights_bytes: bytes, *,
                   targets: Mapping[str, TargetInfo] | None = None,
                   limits: Limits | None = None) -> Artifact:
    """Parse an adapter artifact; with ``targets`` also validate it against that base."""
    manifest = _fields(_header(manifest_bytes, ADAPTER_FORMAT), "manifest",
                       {"format", "version", "components"}, frozenset({"metadata"}))
    raw_components = manifest["components"]
    if not isinstance(raw_components, list) or not raw_components:
        raise AdapterValidationError("must be a non-empty list", tensor="manifest.components")
    specs = []
    for i, raw in enumerate(raw_components):
        where = f"components[{i}]"
        spec = _fields(raw, where, {"method", "prefix", "config", "modules"})
        if not isinstance(spec["method"], str):
            raise AdapterValidationError("must be a string", tensor=f"{where}.method")
        method = registry.get(spec["method"])  # UnknownMethodError
        prefix = spec["prefix"]
        if not isinstance(prefix, str) or _PREFIX.fullmatch(prefix) is None:
            raise AdapterValidationError("must be '' or one name segment ending in '.'",
                                         tensor=f"{where}.prefix")
        config = _config(method.config_type, method.parse_config, spec["config"],
                         f"{where}.config")
        specs.append((method.name, prefix, config, _declared(spec["modules"],
                                                             f"{where}.modules")))
    prefixes = [s[1] for s in specs]
    if len(set(prefixes)) != len(prefixes) or ("" in prefixes and len(prefixes) > 1):
        raise AdapterValidationError("component prefixes must be distinct (and '' only for "
                                     "a single component)", tensor="manifest.components")
    tensors, _ = read_safetensors(weights_bytes, what="weights")
    claimed = {f"{prefix}{path}.{name}": (i, path, name)
               for i, (_, prefix, _, declared) in enumerate(specs)
               for path, names in declared.items() for name in names}
    for key in sorted(tensors):
        if key not in claimed:
            raise AdapterValidationError("key in the weights file is not claimed by any "
                                         "component of the manifest", tensor=key)
    modules: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in specs]
    for key, (i, path, name) in claimed.items():
        if key not in tensors:
            raise AdapterValidationError("key declared in the manifest is missing from the "
                                         "weights file", tensor=key)
        modules[i].setdefault(path, {})[name] = _tensor_ok(key, tensors[key])
    adapter = Adapter(tuple(Component(method, config, modules[i])
                            for i, (method, _, config, _) in enumerate(specs)))
    parts_by_module(adapter)  # at most one weight- and one output-stage part per module
    if targets is not None:
        for component in adapter.components:
            validate_component(component, targets, limits or Limits())
    return Artifact(adapter, _metadata(manifest))


def loads(manifest_bytes: bytes, weights_bytes: bytes, *,
          targets: Mapping[str, TargetInfo] | None = None,
          limits: Limits | None = None) -> Adapter:
    return loads_artifact(manifest_bytes, weights_bytes, targets=targets, limits=limits).adapter


def loads_hypernetwork(manifest_bytes: bytes, weights_bytes: bytes) -> HyperNetwork:
    """Parse a hypernetwork artifact (checked without a base; bind with ``sites``)."""
    manifest = _fields(_header(manifest_bytes, HYPERNET_FORMAT), "manifest",
                       {"format", "version", "generator", "config", "tasks"},
                       frozenset({"metadata"}))
    _metadata(manifest)
    name = manifest["generator"]
    generator = registry.get_generator(name if isinstance(name, str) else repr(name))
    if not isinstance(generator, HyperLoader):
        raise UnsupportedAdapterError(f"generator {name!r} has no tessera artifact format")
    config = _config(HyperLoaderConfig, generator.parse_config, manifest["config"],
                     "manifest.config")
    task_names = manifest["tasks"]
    if (not isinstance(task_names, list) or not all(isinstance(t, str) for t in task_names)
            or len(set(task_names)) != len(task_names)):
        raise AdapterValidationError("must be a list of distinct task names",
                                     tensor="manifest.tasks")
    tensors, _ = read_safetensors(weights_bytes, what="weights")
    expected = [f"hypernet.{n}" for n in [*base_schema(config), *head_names()]]
    expected += [f"task.{t}" for t in task_names]
    for key in sorted(tensors):
        if key not in expected:
            raise AdapterValidationError("key in the weights file is not claimed by the "
                                         "manifest", tensor=key)
    for key in expected:
        if key not in tensors:
            raise AdapterValidationError("key missing from the weights file", tensor=key)
        _tensor_ok(key, tensors[key])
    weights = {k.removeprefix("hypernet."): v for k, v in tensors.items()
               if k.startswith("hypernet.")}
    return generator.build(config, weights, {t: tensors[f"task.{t}"] for t in task_names})


# --- directories ----------------------------------------------------------------------------
def _write(directory: str | Path, files: tuple[bytes, bytes]) -> Path:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / MANIFEST_FILE).write_bytes(files[0])
    (path / WEIGHTS_FILE).write_bytes(files[1])
    return path


def _read(directory: str | Path) -> tuple[bytes, bytes]:
    path = Path(directory)
    for name in (MANIFEST_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise AdapterValidationError(f"{path} has no {name}", tensor=name)
    return (path / MANIFEST_FILE).read_bytes(), (path / WEIGHTS_FILE).read_bytes()


def save(adapter: Adapter, directory: str | Path,
         metadata: Mapping[str, str] | None = None) -> Path:
    return _write(directory, dumps(adapter, metadata))


def load(directory: str | Path, *, targets: Mapping[str, TargetInfo] | None = None,
         limits: Limits | None = None) -> Adapter:
    return loads(*_read(directory), targets=targets, limits=limits)


def save_hypernetwork(hypernet: HyperNetwork, directory: str | Path,
                      metadata: Mapping[str, str] | None = None) -> Path:
    return _write(directory, dumps_hypernetwork(hypernet, metadata))


def load_hypernetwork(directory: str | Path) -> HyperNetwork:
    return loads_hypernetwork(*_read(directory))
