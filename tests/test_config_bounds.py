"""Non-finite or absurd config scalars are refused naming the field, for every method and
generator; finite uploads whose *lowered* slot tensors overflow are refused naming the
tensor, on prepare and on write (DESIGN section 6)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pydantic
import pytest
import torch

from tessera.adapters import AdapterValidationError, PoolConfig, SlotPool, artifact, registry
from tessera.adapters import targets as tg
from tessera.adapters.banks.kron import kron_factors
from tessera.adapters.method import Adapter, Component, MethodConfig
from tessera.adapters.methods.hut import HutConfig
from tessera.adapters.methods.hyperloader import HYPERLOADER, default_config
from tessera.adapters.methods.lora import LoraConfig
from tessera.adapters.methods.soka import SokaConfig
from tessera.adapters.pool import PreparedAdapter
from tessera.adapters.validation import validate_component
from tests.factories import FACTORIES
from tests.models import tiny_model

MODEL = tiny_model("llama", layers=1)
AVAILABLE = tg.discover(MODEL)
Q = "model.layers.0.self_attn.q_proj"

Path = tuple[str | int, ...]
Parse = Callable[[Mapping[str, Any]], Any]
DICT, ITEM = "{}", "[]"  # wildcards: any value of a dict, any item of a list

# Every config type, by registry name (methods and generators).
PARSERS: dict[str, tuple[type[pydantic.BaseModel], Parse]] = {
    **{n: (registry.get(n).config_type, registry.get(n).parse_config)
       for n in registry.names()},
    HYPERLOADER.name: (HYPERLOADER.config_type, HYPERLOADER.parse_config),
}
# Optional nested configs the factories leave out, so that their fields are reachable.
EXTRAS: dict[str, dict[str, Any]] = {"soka": {"selection": {"rule": "energy"}}}


def numeric_paths(schema: Mapping[str, Any], defs: Mapping[str, Any],
                  prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str]]:
    """``(path, "integer" | "number")`` of every numeric leaf of a JSON schema; dict values
    and list items appear as the wildcards ``{}`` and ``[]``."""
    if "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
    for option in schema.get("anyOf", []):
        yield from numeric_paths(option, defs, prefix)
    kind = schema.get("type")
    if kind in ("integer", "number"):
        yield prefix, kind
    elif kind == "object":
        for name, sub in schema.get("properties", {}).items():
            yield from numeric_paths(sub, defs, (*prefix, name))
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            yield from numeric_paths(extra, defs, (*prefix, DICT))
    elif kind == "array":
        yield from numeric_paths(schema["items"], defs, (*prefix, ITEM))


def leaves(name: str) -> list[tuple[tuple[str, ...], str]]:
    config_type, _ = PARSERS[name]
    schema = config_type.model_json_schema()
    return sorted(set(numeric_paths(schema, schema.get("$defs", {}))))


@functools.cache
def sample(name: str) -> str:
    """A valid raw config of ``name`` (JSON text: each test mutates its own copy)."""
    if name == HYPERLOADER.name:
        raw = default_config(AVAILABLE).model_dump(mode="json")
    else:
        adapter = FACTORIES[name](MODEL, torch.Generator().manual_seed(0))
        raw = next(c for c in adapter.components if c.method == name).config.model_dump(
            mode="json")
    raw.update(EXTRAS.get(name, {}))
    PARSERS[name][1](raw)  # the base case parses
    return json.dumps(raw)


def set_leaf(raw: dict[str, Any], pattern: tuple[str, ...], value: object) -> Path:
    """Put ``value`` at ``pattern``, creating missing containers and resolving a wildcard to
    the first existing entry (or a new one); returns the concrete path. An optional nested
    config that is None gets ``{}`` (give it its required fields in ``EXTRAS``)."""
    node: Any = raw
    path: list[str | int] = []
    for i, step in enumerate(pattern):
        last = i == len(pattern) - 1
        fresh: Any = value if last else [] if pattern[i + 1] == ITEM else {}
        key: str | int
        if step == ITEM:
            key = 0
            if not node:
                node.append(fresh)
        else:
            key = next(iter(node), "q_proj") if step == DICT else step
            if node.get(key) is None:
                node[key] = fresh
        if last:
            node[key] = value
        path.append(key)
        node = node[key]
    return tuple(path)


def bad_values(kind: str) -> list[object]:
    values: list[object] = [float("inf"), float("-inf"), float("nan"), 1e38]
    return [*values, 10**38] if kind == "integer" else values


CASES = [pytest.param(name, pattern, value, id=f"{name}-{'.'.join(pattern)}-{value!r}")
         for name in PARSERS for pattern, kind in leaves(name) for value in bad_values(kind)]


def test_every_method_and_generator_is_covered() -> None:
    assert set(PARSERS) == set(registry.all_names())
    for name in PARSERS:
        assert leaves(name), f"{name}: no numeric config field found"


@pytest.mark.parametrize(("name", "pattern", "value"), CASES)
def test_numeric_config_field_refuses_non_finite_and_absurd(
        name: str, pattern: tuple[str, ...], value: object) -> None:
    raw = json.loads(sample(name))
    path = set_leaf(raw, pattern, value)
    with pytest.raises(pydantic.ValidationError) as exc:
        PARSERS[name][1](raw)
    assert [e["loc"] for e in exc.value.errors()] == [path], exc.value.errors()
    assert str(path[-1]) in str(exc.value)


@pytest.mark.parametrize(("name", "pattern"), [
    pytest.param(name, pattern, id=f"{name}-{'.'.join(pattern)}")
    for name in PARSERS for pattern, _ in leaves(name)])
def test_artifact_manifest_names_an_absurd_field(name: str, pattern: tuple[str, ...]) -> None:
    """Through the tessera artifact parser: AdapterValidationError (HTTP 422) naming the field.
    (Infinity/NaN text is refused earlier there, as a JSON constant.)"""
    raw = json.loads(sample(name))
    path = set_leaf(raw, pattern, 10**38)
    dotted = ".".join(str(p) for p in path)
    if name == HYPERLOADER.name:
        manifest = {"format": artifact.HYPERNET_FORMAT, "version": 1, "generator": name,
                    "config": raw, "tasks": []}
        with pytest.raises(AdapterValidationError) as exc:
            artifact.loads_hypernetwork(json.dumps(manifest).encode(), b"")
        assert exc.value.tensor == f"manifest.config.{dotted}"
        return
    manifest = {"format": artifact.ADAPTER_FORMAT, "version": 1, "components": [
        {"method": name, "prefix": "", "config": raw, "modules": {Q: ["w"]}}]}
    with pytest.raises(AdapterValidationError) as exc:
        artifact.loads(json.dumps(manifest).encode(), b"")
    assert exc.value.tensor == f"components[0].config.{dotted}"


@pytest.mark.parametrize("alpha", [5000.0, 5000.5])
def test_hyperloader_alpha_leaves_room_for_the_fused_qkv_doubling(alpha: float) -> None:
    """A fused q/v LoRA is served with 2 alpha: the generator's bound is half LoRA's."""
    raw = json.loads(sample(HYPERLOADER.name))
    if alpha > 5000:
        with pytest.raises(pydantic.ValidationError, match="lora_alpha"):
            HYPERLOADER.parse_config({**raw, "lora_alpha": alpha})
    else:
        config = HYPERLOADER.parse_config({**raw, "lora_alpha": alpha})
        LoraConfig(r=2 * config.lora_rank, lora_alpha=2 * config.lora_alpha,
                   target_modules=["q_proj"])


# --- lowered tensors ------------------------------------------------------------------------

def one_module(method: str, config: MethodConfig, dtype: torch.dtype,
               tensors: dict[str, torch.Tensor]) -> Adapter:
    return Adapter((Component(method, config, {Q: {k: v.to(dtype)
                                                  for k, v in tensors.items()}}),))


def lora(dtype: torch.dtype, b: float, alpha: float, r: int = 4) -> Adapter:
    t = AVAILABLE[Q]
    return one_module("lora", LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj"]),
                      dtype, {"lora_A": torch.full((r, t.in_features), 0.01),  # [r, in]
                              "lora_B": torch.full((t.out_features, r), b)})  # [out, r]


def soka(dtype: torch.dtype, a: float, scale: float, r: int = 2) -> Adapter:
    f = kron_factors(AVAILABLE[Q].out_features, AVAILABLE[Q].in_features)
    return one_module("soka", SokaConfig(r=r, scale=scale, target_modules=["q_proj"]),
                      dtype, {"soka_A": torch.full((r, f.m, f.n), a),  # [r, m, n]
                              "soka_B": torch.full((r, f.p, f.q), 0.01)})  # [r, p, q]


def hut(dtype: torch.dtype, a: float, alpha: float, r: int = 4) -> Adapter:
    t = AVAILABLE[Q]
    return one_module("hut", HutConfig(r=r, alpha=alpha, target_modules=["q_proj"]), dtype,
                      {"hut_A": torch.full((t.out_features, r), a),  # [out, r]
                       "hut_B": torch.full((r, t.in_features), 0.01),  # [r, in]
                       "hut_gamma": torch.ones(t.in_features), "hut_beta": torch.zeros(
                           t.in_features)})


OVERFLOWS = {
    # finite fp32 B, allowed s = 64 / 4: s B overflows float32 while lowering
    "lora-fp32": (torch.float32, lora(torch.float32, 1e38, 64.0), f"{Q}.lowrank.B"),
    # finite fp16 B near its limit, s = 16 / 4: s B is finite in fp32, not in an fp16 bank
    "lora-fp16": (torch.float16, lora(torch.float16, 6e4, 16.0), f"{Q}.lowrank.B"),
    "soka-fp16": (torch.float16, soka(torch.float16, 6e4, 2.0), f"{Q}.kron.A"),
    "hut-fp16": (torch.float16, hut(torch.float16, 6e4, 8.0), f"{Q}.hadamard.a"),
}


@functools.cache
def pool_of(dtype: torch.dtype) -> SlotPool:
    return SlotPool(tiny_model("llama", layers=1, dtype=dtype),
                    PoolConfig(num_slots=2, max_rank=8))


@pytest.mark.parametrize("case", sorted(OVERFLOWS))
def test_finite_upload_with_overflowing_lowered_tensor_is_refused(case: str) -> None:
    dtype, adapter, key = OVERFLOWS[case]
    pool = pool_of(dtype)
    for component in adapter.components:  # the uploaded tensors and config are fine
        validate_component(component, pool.targets, pool.limits)
    with pytest.raises(AdapterValidationError, match="not finite once lowered") as exc:
        pool.prepare(adapter)
    assert exc.value.tensor == key
    with pytest.raises(AdapterValidationError):
        pool.load(1, adapter)
    assert pool.resident[1] is None


def test_the_same_scale_with_sane_weights_is_accepted() -> None:
    pool = pool_of(torch.float16)
    pool.load(1, lora(torch.float16, 0.5, 16.0))
    pool.evict(1)


def snapshot(pool: SlotPool, slot: int) -> dict[str, torch.Tensor]:
    return {f"{path}.{kind}.{name}": t[slot].clone()
            for path, banks in pool.banks().items() for kind, bank in banks.items()
            for name, t in bank.t.items()}


def test_write_refuses_non_finite_data_and_keeps_the_slot() -> None:
    pool = SlotPool(tiny_model("llama", layers=1), PoolConfig(num_slots=2, max_rank=8))
    resident = lora(torch.float32, 0.5, 8.0)
    pool.load(0, resident)
    before = snapshot(pool, 0)
    good = pool.prepare(lora(torch.float32, 0.25, 8.0))
    data = dict(good.data)
    lowered = data[(Q, "lowrank")]
    broken = lowered.tensors["B"].clone()
    broken[0, 0] = float("inf")
    data[(Q, "lowrank")] = type(lowered)({**lowered.tensors, "B": broken}, lowered.meta)
    with pytest.raises(AdapterValidationError, match="not finite") as exc:
        pool.write(0, PreparedAdapter(good.adapter, data))
    assert exc.value.tensor == f"{Q}.lowrank.B"
    assert pool.resident[0] is resident
    after = snapshot(pool, 0)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_write_refuses_data_that_overflows_the_banks_dtype() -> None:
    """Prepared by a float32 pool, written into a float16 one: the cast would overflow."""
    prepared = pool_of(torch.float32).prepare(lora(torch.float32, 3e4, 16.0))  # s B = 1.2e5
    pool = pool_of(torch.float16)
    with pytest.raises(AdapterValidationError, match="float16") as exc:
        pool.write(0, prepared)
    assert exc.value.tensor == f"{Q}.lowrank.B"
    assert pool.resident[0] is None
