"""Every rule of adapters/validation.py and adapters/safeio.py rejects, with the right error
type and a message naming the offending tensor or field."""

from __future__ import annotations

import io
import json
import pickle
import struct
from collections.abc import Callable
from typing import Any

import pydantic
import pytest
import torch

from tessera.adapters import (
    Adapter,
    AdapterValidationError,
    Component,
    Limits,
    MethodConfig,
    UnsafeFormatError,
    registry,
)
from tessera.adapters import targets as tg
from tessera.adapters.methods.lora import LoraConfig
from tessera.adapters.safeio import (
    UNSAFE_SUFFIXES,
    read_safetensors,
    refuse_unsafe_name,
    write_safetensors,
)
from tessera.adapters.validation import validate_component
from tests.factories import FACTORIES
from tests.models import tiny_model

MODEL = tiny_model("llama", layers=1)
AVAILABLE = tg.discover(MODEL)
Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"


def lora_tensors(path: str, r: int = 4) -> dict[str, torch.Tensor]:
    t = AVAILABLE[path]
    gen = torch.Generator().manual_seed(0)
    return {"lora_A": torch.randn(r, t.in_features, generator=gen),
            "lora_B": torch.randn(t.out_features, r, generator=gen)}


def lora_component(modules: dict[str, dict[str, torch.Tensor]] | None = None,
                   **config: Any) -> Component:
    raw: dict[str, Any] = {"r": 4, "lora_alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}
    raw.update(config)
    if modules is None:
        modules = {Q: lora_tensors(Q), V: lora_tensors(V)}
    return Component("lora", LoraConfig(**raw), modules)


def rejects(component: Component, tensor: str, match: str,
            limits: Limits | None = None) -> AdapterValidationError:
    """The component is refused, naming ``tensor`` in the error and its message."""
    with pytest.raises(AdapterValidationError, match=match) as exc:
        validate_component(component, AVAILABLE, limits or Limits())
    assert exc.value.tensor == tensor
    assert tensor in str(exc.value)
    return exc.value


def test_a_valid_component_passes() -> None:
    validate_component(lora_component(), AVAILABLE, Limits())  # the baseline of every case


# --- validation.py: modules -------------------------------------------------------------------

def test_module_missing_from_the_base() -> None:
    bad = "model.layers.7.self_attn.q_proj"  # one layer only
    comp = lora_component({Q: lora_tensors(Q), V: lora_tensors(V), bad: lora_tensors(Q)})
    rejects(comp, f"{bad}.lora_A", "does not exist in the base model")


def test_module_that_is_not_a_projection() -> None:
    bad = "model.layers.0.input_layernorm"
    comp = lora_component({Q: lora_tensors(Q), V: lora_tensors(V), bad: lora_tensors(Q)})
    rejects(comp, f"{bad}.lora_A", "not an adaptable projection")


def test_module_not_selected_by_target_modules() -> None:
    comp = lora_component({Q: lora_tensors(Q), V: lora_tensors(V)}, target_modules=["q_proj"])
    rejects(comp, f"{V}.lora_A", "not selected by the config's target modules")


@pytest.mark.parametrize("spec", [["nonexistent"], [], "model\\.nothing"])
def test_target_modules_selecting_nothing(spec: list[str] | str) -> None:
    rejects(lora_component({}, target_modules=spec), "config.target_modules",
            "selects no adaptable module")


def test_targeted_module_without_weights() -> None:
    rejects(lora_component({Q: lora_tensors(Q)}), f"{V}.lora_A",
            "missing tensor for a targeted module")


# --- validation.py: tensors -------------------------------------------------------------------

def with_tensor(name: str, value: torch.Tensor | None) -> Component:
    tensors = lora_tensors(V)
    if value is None:
        del tensors[name]
    else:
        tensors[name] = value
    return lora_component({Q: lora_tensors(Q), V: tensors})


def test_missing_tensor() -> None:
    rejects(with_tensor("lora_B", None), f"{V}.lora_B", "missing tensor")


def test_unexpected_tensor() -> None:
    rejects(with_tensor("lora_C", torch.zeros(4)), f"{V}.lora_C", "unexpected tensor")


@pytest.mark.parametrize("shape", [(5, 32), (4, 31), (32, 4), (4,), (1, 4, 32)])
def test_shape_mismatch(shape: tuple[int, ...]) -> None:
    assert AVAILABLE[V].in_features == 32
    rejects(with_tensor("lora_A", torch.zeros(shape)), f"{V}.lora_A",
            r"does not match the expected \[4, 32\]")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.float64,
                                   torch.complex64])
def test_non_float_dtype(dtype: torch.dtype) -> None:
    rejects(with_tensor("lora_A", torch.zeros(4, 32, dtype=dtype)), f"{V}.lora_A",
            "is not float32, float16 or bfloat16")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_accepted_float_dtypes(dtype: torch.dtype) -> None:
    validate_component(with_tensor("lora_A", torch.ones(4, 32, dtype=dtype)), AVAILABLE,
                       Limits())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_values(value: float, dtype: torch.dtype) -> None:
    bad = lora_tensors(V)["lora_B"].to(dtype)
    bad[3, 1] = value
    rejects(with_tensor("lora_B", bad), f"{V}.lora_B", "contains NaN or Inf")


def test_rank_over_the_limit() -> None:
    rejects(lora_component(), f"{Q}.lora_A", r"rank 4 exceeds the limit 3 \(max_rank\)",
            Limits(max_rank=3))
    validate_component(lora_component(), AVAILABLE, Limits(max_rank=4))  # the limit itself


def test_rank_pattern_over_the_limit_names_that_module() -> None:
    modules = {Q: lora_tensors(Q, 2), V: lora_tensors(V, 6)}
    comp = lora_component(modules, r=2, rank_pattern={"v_proj": 6})
    rejects(comp, f"{V}.lora_A", "rank 6 exceeds the limit 5", Limits(max_rank=5))


class OtherConfig(MethodConfig):
    target_modules: list[str]


def test_config_of_the_wrong_type() -> None:
    comp = Component("lora", OtherConfig(target_modules=["q_proj"]), {Q: lora_tensors(Q)})
    rejects(comp, "config", "config is OtherConfig, expected LoraConfig")


# --- every method: the generic tensor rules name the tensor ------------------------------------

def first_tensor(name: str) -> tuple[Adapter, Component, str, str]:
    adapter = FACTORIES[name](MODEL, torch.Generator().manual_seed(0))
    comp = next(c for c in adapter.components if c.modules)
    path = next(iter(comp.modules))
    return adapter, comp, path, next(iter(comp.modules[path]))


def replace_tensor(comp: Component, path: str, name: str,
                   change: Callable[[dict[str, torch.Tensor]], object]) -> Component:
    tensors = dict(comp.modules[path])
    change(tensors)
    return Component(comp.method, comp.config, {**comp.modules, path: tensors})


def set_first(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def apply(t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        out.view(-1)[0] = value
        return out
    return apply


CORRUPTIONS: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {
    "nan": ("contains NaN or Inf", set_first(float("nan"))),
    "inf": ("contains NaN or Inf", set_first(float("inf"))),
    "int": ("is not float32", lambda t: t.to(torch.int32)),
    "shape": ("does not match the expected", lambda t: torch.zeros(*t.shape, 2)),
}


@pytest.mark.parametrize("method", registry.all_names())
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_every_method_names_a_corrupt_tensor(method: str, corruption: str) -> None:
    _, comp, path, name = first_tensor(method)
    validate_component(comp, AVAILABLE, Limits())
    match, change = CORRUPTIONS[corruption]

    def corrupt(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = change(tensors[name])

    rejects(replace_tensor(comp, path, name, corrupt), f"{path}.{name}", match)


@pytest.mark.parametrize("method", registry.all_names())
def test_every_method_names_a_missing_or_unexpected_tensor(method: str) -> None:
    _, comp, path, name = first_tensor(method)
    rejects(replace_tensor(comp, path, name, lambda t: t.pop(name)), f"{path}.{name}",
            "missing tensor")
    extra = {"bogus_tensor": torch.zeros(2)}
    rejects(replace_tensor(comp, path, name, lambda t: t.update(extra)),
            f"{path}.bogus_tensor", "unexpected tensor")


# --- strict configs -------------------------------------------------------------------------

def raw_config(method: str) -> tuple[Any, dict[str, Any]]:
    _, comp, _, _ = first_tensor(method)
    m = registry.get(comp.method)
    raw = comp.config.model_dump()
    assert m.parse_config(raw) == comp.config  # the base case parses
    return m, raw


def config_error(method: Any, raw: dict[str, Any]) -> pydantic.ValidationError:
    with pytest.raises(pydantic.ValidationError) as exc:
        method.parse_config(raw)
    return exc.value


@pytest.mark.parametrize("method", registry.all_names())
def test_config_rejects_an_unknown_key(method: str) -> None:
    m, raw = raw_config(method)
    err = config_error(m, {**raw, "surprise_key": 1})
    assert ("surprise_key",) in [e["loc"] for e in err.errors()]
    assert "surprise_key" in str(err)


@pytest.mark.parametrize(("field", "value"), [("r", "8"), ("r", 8.0), ("use_rslora", "yes"),
                                              ("target_modules", 3), ("lora_alpha", "8")])
def test_lora_config_rejects_a_wrong_type(field: str, value: object) -> None:
    raw = {"r": 8, "lora_alpha": 8.0, "target_modules": ["q_proj"], field: value}
    err = config_error(registry.get("lora"), raw)
    assert all(e["loc"][0] == field for e in err.errors()), err.errors()
    assert field in str(err)


@pytest.mark.parametrize(("field", "value"), [("r", 0), ("r", -3), ("lora_alpha", 0.0)])
def test_lora_config_rejects_out_of_range_values(field: str, value: object) -> None:
    raw = {"r": 8, "lora_alpha": 8.0, "target_modules": ["q_proj"], field: value}
    err = config_error(registry.get("lora"), raw)
    assert [e["loc"] for e in err.errors()] == [(field,)]
    assert field in str(err)


def test_lora_config_requires_target_modules() -> None:
    err = config_error(registry.get("lora"), {"r": 8})
    assert [e["loc"] for e in err.errors()] == [("target_modules",)]


@pytest.mark.parametrize("method", registry.names())
def test_every_rank_field_rejects_zero(method: str) -> None:
    m, raw = raw_config(method)
    rank_fields = [f for f in ("r", "dim") if f in raw]
    assert rank_fields, f"{method}: no rank field (r or dim) in {sorted(raw)}"
    for field in rank_fields:
        err = config_error(m, {**raw, field: 0})
        assert [e["loc"] for e in err.errors()] == [(field,)]


# --- safeio: pickle -------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickle_payload_is_refused(protocol: int) -> None:
    payload = pickle.dumps({"lora_A": [1.0, 2.0]}, protocol=protocol)
    with pytest.raises(UnsafeFormatError, match=r"adapter_model\.bin: payload is a pickle"):
        read_safetensors(payload, what="adapter_model.bin")


def test_large_pickle_is_refused() -> None:
    # protocol 4+ frames: bytes 3-10 hold the frame length; still no safetensors header
    payload = pickle.dumps(b"\x00" * (16 << 20), protocol=5)
    with pytest.raises(UnsafeFormatError, match="payload is a pickle"):
        read_safetensors(payload)


def test_safetensors_whose_first_byte_is_the_pickle_marker_loads() -> None:
    # the first byte is the header length's low byte: 0x80 for one length in 256
    found = 0
    for n in range(1, 600):
        tensors = {"w" * n: torch.arange(3.0)}
        data = write_safetensors(tensors, {"format": "pt"})
        if data[:1] == b"\x80":
            found += 1
            loaded, metadata = read_safetensors(data)
            assert torch.equal(loaded["w" * n], tensors["w" * n]), n
            assert metadata == {"format": "pt"}
    assert found >= 2


@pytest.mark.parametrize("zipfile", [True, False])
def test_torch_save_payload_is_refused(zipfile: bool) -> None:
    buffer = io.BytesIO()
    torch.save({"lora_A": torch.zeros(2)}, buffer, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(UnsafeFormatError, match="weights: payload is a pickle"):
        read_safetensors(buffer.getvalue())


@pytest.mark.parametrize("suffix", UNSAFE_SUFFIXES)
def test_pickle_file_names_are_refused(suffix: str) -> None:
    name = f"adapter_model{suffix.upper()}"
    with pytest.raises(UnsafeFormatError, match=name):
        refuse_unsafe_name(name)
    refuse_unsafe_name("adapter_model.safetensors")  # accepted


# --- safeio: malformed safetensors ----------------------------------------------------------

WHAT = "adapter_model.safetensors"
KEY = "base_model.model.layers.0.q_proj.lora_A.weight"


def valid_payload() -> bytes:
    return write_safetensors({KEY: torch.arange(6, dtype=torch.float32).reshape(2, 3),
                              "other": torch.ones(4, dtype=torch.float16)},
                             metadata={"format": "pt"})


def payload(header: object, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def entry(dtype: str = "F32", shape: list[int] | None = None,
          offsets: list[int] | None = None) -> dict[str, object]:
    return {"dtype": dtype, "shape": [2, 3] if shape is None else shape,
            "data_offsets": [0, 24] if offsets is None else offsets}


def bad_payload(data: bytes, tensor: str, match: str) -> None:
    with pytest.raises(AdapterValidationError, match=match) as exc:
        read_safetensors(data, what=WHAT)
    assert exc.value.tensor == tensor
    assert tensor in str(exc.value)


def test_a_valid_payload_reads() -> None:
    tensors, meta = read_safetensors(valid_payload(), what=WHAT)
    assert torch.equal(tensors[KEY], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert meta == {"format": "pt"}
    tensors, _ = read_safetensors(payload({KEY: entry()}, bytes(24)), what=WHAT)
    assert torch.equal(tensors[KEY], torch.zeros(2, 3))  # the hand-built layout is valid


@pytest.mark.parametrize("keep", [0, 5, 7])
def test_truncated_below_the_length_field(keep: int) -> None:
    bad_payload(valid_payload()[:keep], WHAT, "shorter than its 8-byte header length")


def test_truncated_inside_the_header() -> None:
    bad_payload(valid_payload()[:20], WHAT, "header length .* does not fit a 20-byte payload")


def test_truncated_inside_the_data() -> None:
    data = payload({KEY: entry()}, bytes(24))
    bad_payload(data[:-4], KEY, r"data offsets \[0, 24\] outside the 20-byte data section")


@pytest.mark.parametrize("size", [2**63, 101 * 1024 * 1024, 10_000])
def test_bad_header_length(size: int) -> None:
    data = valid_payload()
    bad_payload(struct.pack("<Q", size) + data[8:], WHAT, f"header length {size} does not fit")


@pytest.mark.parametrize("header", [b"{not json}", b"\xff\xfe\x00garbage", b'{"a": 1'])
def test_header_not_json(header: bytes) -> None:
    data = struct.pack("<Q", len(header)) + header + bytes(8)
    bad_payload(data, WHAT, "malformed safetensors header")


@pytest.mark.parametrize("header", [[1, 2], "text", 3])
def test_header_not_an_object(header: object) -> None:
    bad_payload(payload(header, bytes(8)), WHAT, "not a JSON object")


@pytest.mark.parametrize("offsets", [[0, 28], [24, 48], [-4, 20], [16, 8]])
def test_offsets_out_of_range(offsets: list[int]) -> None:
    bad_payload(payload({KEY: entry(offsets=offsets)}, bytes(24)), KEY,
                "outside the 24-byte data section")


@pytest.mark.parametrize(("dtype", "shape"), [("F16", [2, 3]), ("F32", [2, 2]),
                                              ("F64", [2, 3]), ("I8", [4, 5])])
def test_dtype_and_size_mismatch(dtype: str, shape: list[int]) -> None:
    bad_payload(payload({KEY: entry(dtype=dtype, shape=shape)}, bytes(24)), KEY,
                f"24 bytes for a {dtype} tensor of shape")


@pytest.mark.parametrize("dtype", ["F8_XYZ", "float32", None, 4])
def test_unsupported_dtype(dtype: object) -> None:
    bad = {"dtype": dtype, "shape": [2, 3], "data_offsets": [0, 24]}
    bad_payload(payload({KEY: bad}, bytes(24)), KEY, "unsupported safetensors dtype")


@pytest.mark.parametrize("bad", [
    [1, 2], "x", {"dtype": "F32", "shape": [2, -3], "data_offsets": [0, 24]},
    {"dtype": "F32", "shape": "2x3", "data_offsets": [0, 24]},
    {"dtype": "F32", "shape": [2, 3], "data_offsets": [0]},
    {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24.0]},
    {"dtype": "F32", "shape": [2, 3]},
])
def test_malformed_entry(bad: object) -> None:
    bad_payload(payload({KEY: bad}, bytes(24)), KEY, "malformed safetensors entry")


def test_overlapping_tensors_are_caught_by_the_library() -> None:
    """Entries that pass the per-entry checks but overlap: the safetensors reader's own
    error comes back as a validation error naming the payload, not a crash."""
    data = payload({KEY: entry(), "b": entry()}, bytes(24))
    bad_payload(data, WHAT, "malformed safetensors")
