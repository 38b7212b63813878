"""tessera artifacts: bit-exact round trips and every rejection rule."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tessera.adapters import (
    AdapterValidationError,
    UnknownMethodError,
    UnsafeFormatError,
    registry,
)
from tessera.adapters import artifact as art
from tessera.adapters import targets as tg
from tessera.adapters.hypernet import HyperNetwork
from tessera.adapters.method import Adapter, Component
from tessera.adapters.methods.hyperloader import HYPERLOADER
from tests.factories import FACTORIES, randn
from tests.factories.bottleneck import make_bottleneck_adapter
from tests.factories.hyperloader import make_hypernetwork
from tests.models import tiny_model


def assert_same_adapter(a: Adapter, b: Adapter) -> None:
    assert a.methods == b.methods
    for ca, cb in zip(a.components, b.components, strict=True):
        assert ca.config == cb.config and type(ca.config) is type(cb.config)
        assert list(ca.config.model_dump()) == list(cb.config.model_dump())
        assert set(ca.modules) == set(cb.modules)
        for path, tensors in ca.modules.items():
            assert set(tensors) == set(cb.modules[path])
            for name, tensor in tensors.items():
                other = cb.modules[path][name]
                assert tensor.dtype == other.dtype and tensor.shape == other.shape
                assert torch.equal(tensor.view(torch.uint8), other.view(torch.uint8)), name


def lora(model: torch.nn.Module, seed: int = 0) -> Adapter:
    return FACTORIES["lora"](model, torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return tiny_model("llama")


def roundtrip(adapter: Adapter) -> Adapter:
    manifest, weights = art.dumps(adapter)
    loaded = art.loads(manifest, weights)
    assert art.dumps(loaded) == (manifest, weights)  # canonical bytes
    return loaded


@pytest.mark.parametrize("method", registry.all_names())
def test_roundtrip_every_registered_method(method: str, llama: torch.nn.Module) -> None:
    adapter = FACTORIES[method](llama, torch.Generator().manual_seed(1))
    loaded = roundtrip(adapter)
    assert_same_adapter(adapter, loaded)
    art.loads(*art.dumps(adapter), targets=tg.discover(llama))  # valid on its base


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_roundtrip_keeps_low_precision_bits(dtype: torch.dtype, llama: torch.nn.Module) -> None:
    adapter = lora(llama)
    (c,) = adapter.components
    low = Adapter((Component("lora", c.config, {p: {n: t.to(dtype) for n, t in ts.items()}
                                                for p, ts in c.modules.items()}),))
    assert_same_adapter(low, roundtrip(low))


def test_composite_and_duplicate_method_prefixes(llama: torch.nn.Module, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(2)
    a, b = lora(llama, 3), make_bottleneck_adapter(llama, gen, dim=3, layer_norm=False)
    composite = Adapter((*a.components, *b.components))
    (ca,) = a.components
    split = Adapter(tuple(
        Component("lora", ca.config.model_copy(update={"target_modules": [p]}), {p: ts})
        for p, ts in list(ca.modules.items())[:2]))
    for adapter, prefixes in ((composite, ["lora.", "bottleneck."]),
                              (split, ["lora_0.", "lora_1."])):
        manifest, weights = art.dumps(adapter, metadata={"note": "x"})
        parsed = json.loads(manifest)
        assert [c["prefix"] for c in parsed["components"]] == prefixes
        assert all(any(k.startswith(p) for p in prefixes) for k in st_load(weights))
        found = art.loads_artifact(manifest, weights)
        assert found.metadata == {"note": "x"}
        assert_same_adapter(adapter, found.adapter)
    path = art.save(composite, tmp_path / "composite", metadata={"base": "llama"})
    assert sorted(p.name for p in path.iterdir()) == [art.MANIFEST_FILE, art.WEIGHTS_FILE]
    assert_same_adapter(composite, art.load(path, targets=tg.discover(llama)))


def test_rank_pattern_order_survives(llama: torch.nn.Module) -> None:
    adapter = lora(llama)
    (c,) = adapter.components
    config = c.config.model_copy(update={"rank_pattern": {"v_proj": 2, "q_proj": 3}})
    loaded = roundtrip(Adapter((Component("lora", config, c.modules),)))
    assert list(loaded.components[0].config.rank_pattern) == ["v_proj", "q_proj"]  # type: ignore[attr-defined]


def hypernet(model: torch.nn.Module) -> HyperNetwork:
    gen = torch.Generator().manual_seed(4)
    hn = make_hypernetwork(model, gen)
    hn.register_task("t1", randn(gen, hn.config.task_dim))
    hn.register_task("t0", randn(gen, hn.config.task_dim).half())
    return hn


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hypernetwork_roundtrip(family: str, tmp_path: Path) -> None:
    model = tiny_model(family)
    hn = hypernet(model)
    manifest, weights = art.dumps_hypernetwork(hn, metadata={"paper": "2407.01411"})
    loaded = art.loads_hypernetwork(manifest, weights)
    assert loaded.config == hn.config and list(loaded.tasks) == ["t1", "t0"]
    for src, dst in ((hn.weights, loaded.weights), (hn.tasks, loaded.tasks)):
        assert set(src) == set(dst)
        assert all(src[k].dtype == dst[k].dtype and torch.equal(src[k], dst[k]) for k in src)
    assert art.dumps_hypernetwork(loaded, metadata={"paper": "2407.01411"}) == (manifest,
                                                                                 weights)
    targets = tg.discover(model)
    assert_same_adapter(HYPERLOADER.generate(hn, "t0", targets),
                        HYPERLOADER.generate(art.load_hypernetwork(
                            art.save_hypernetwork(hn, tmp_path / "hn")), "t0", targets))


# --- rejections --------------------------------------------------------------------------------
def edit(manifest: bytes, fn: Callable[[dict[str, Any]], None]) -> bytes:
    obj = json.loads(manifest)
    fn(obj)
    return json.dumps(obj).encode()


def reject(manifest: bytes, weights: bytes, match: str, tensor: str | None = None,
           error: type[Exception] = AdapterValidationError, **kw: Any) -> None:
    with pytest.raises(error, match=match) as err:
        art.loads(manifest, weights, **kw)
    if tensor is not None:
        assert getattr(err.value, "tensor", None) == tensor


def test_manifest_rejections(llama: torch.nn.Module) -> None:
    m, w = art.dumps(lora(llama))
    path = "model.layers.0.self_attn.q_proj"
    reject(b"{not json", w, "not valid JSON", "manifest")
    reject(b"\xff\xfe", w, "not valid JSON", "manifest")
    reject(b"[1, 2]", w, "JSON object", "manifest")
    reject(m[:-1] + b', "format": "x"}', w, "duplicate JSON key", "manifest")
    reject(edit(m, lambda o: o.update(format="peft")), w, "unknown artifact format",
           "manifest.format")
    reject(edit(m, lambda o: o.update(format=art.HYPERNET_FORMAT)), w,
           "unknown artifact format")
    for version in (2, "1", True, 1.0, None):
        reject(edit(m, lambda o, v=version: o.update(version=v)), w, "unsupported",
               "manifest.version")
    reject(edit(m, lambda o: o.update(extra=1)), w, "unknown field", "manifest.extra")
    reject(edit(m, lambda o: o.pop("components")), w, "missing field", "manifest.components")
    reject(edit(m, lambda o: o.update(components=[])), w, "non-empty", "manifest.components")
    reject(edit(m, lambda o: o.update(metadata={"a": 1})), w, "strings", "metadata")
    reject(edit(m, lambda o: o["components"][0].update(extra=1)), w, "unknown field",
           "components[0].extra")
    reject(edit(m, lambda o: o["components"][0].pop("modules")), w, "missing field",
           "components[0].modules")
    reject(edit(m, lambda o: o["components"][0].update(method="lorax")), w,
           "unknown adapter method", error=UnknownMethodError)
    reject(edit(m, lambda o: o["components"][0]["config"].update(r=0)), w,
           "greater than", "components[0].config.r")
    reject(edit(m, lambda o: o["components"][0]["config"].update(use_dora="yes")), w,
           "Extra inputs", "components[0].config.use_dora")
    reject(edit(m, lambda o: o["components"][0].update(config=[1])), w, "JSON object",
           "components[0].config")
    for prefix in ("a.b.", "lora", "../", 3):
        reject(edit(m, lambda o, p=prefix: o["components"][0].update(prefix=p)), w,
               "segment", "components[0].prefix")
    reject(edit(m, lambda o: o["components"][0]["modules"][path].append("lora_A")), w,
           "distinct", f"components[0].modules.{path}")
    reject(edit(m, lambda o: o["components"][0]["modules"].update({"a..b": ["x"]})), w,
           "module path", "components[0].modules.a..b")
    reject(edit(m, lambda o: o["components"][0]["config"].update(lora_alpha=float("nan"))), w,
           "JSON constant NaN", "manifest")
    # key bookkeeping
    reject(edit(m, lambda o: o["components"][0]["modules"][path].remove("lora_B")), w,
           "not claimed", f"lora.{path}.lora_B")
    reject(edit(m, lambda o: o["components"][0].update(prefix="other.")), w, "not claimed")
    tensors = st_load(w)
    del tensors[f"lora.{path}.lora_A"]
    reject(m, st_save(tensors), "missing from the weights", f"lora.{path}.lora_A")


def test_weight_rejections(llama: torch.nn.Module) -> None:
    m, w = art.dumps(lora(llama))
    key = "lora.model.layers.1.self_attn.v_proj.lora_B"
    tensors = st_load(w)
    reject(m, st_save({**tensors, key: tensors[key].clone().fill_(float("inf"))}), "NaN or Inf",
           key)
    reject(m, st_save({**tensors, key: tensors[key].to(torch.int32)}), "dtype", key)
    reject(m, st_save({**tensors, "stray": torch.zeros(1)}), "not claimed", "stray")
    reject(m, b"\x80\x04garbage", "pickle", error=UnsafeFormatError)
    reject(m, w[:-3], "data offsets .* outside", key)  # truncated file
    # shape against the base: only checked when a base is given
    bad = {**tensors, key: torch.zeros(3, 3)}
    art.loads(m, st_save(bad))
    reject(m, st_save(bad), "does not match", "model.layers.1.self_attn.v_proj.lora_B",
           targets=tg.discover(llama))


def test_two_output_components_on_one_module(llama: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(5)
    (a,) = make_bottleneck_adapter(llama, gen, dim=2).components
    (b,) = make_bottleneck_adapter(llama, gen, dim=3).components
    m, w = art.dumps(Adapter((a, b)))
    reject(m, w, "several output-stage components")


def test_hypernetwork_rejections(llama: torch.nn.Module) -> None:
    m, w = art.dumps_hypernetwork(hypernet(llama))
    tensors = st_load(w)

    def bad(manifest: bytes, weights: bytes, match: str, tensor: str | None = None,
            error: type[Exception] = AdapterValidationError) -> None:
        with pytest.raises(error, match=match) as err:
            art.loads_hypernetwork(manifest, weights)
        if tensor is not None:
            assert getattr(err.value, "tensor", None) == tensor

    bad(edit(m, lambda o: o.update(format=art.ADAPTER_FORMAT)), w, "format", "manifest.format")
    bad(edit(m, lambda o: o.update(version=0)), w, "unsupported", "manifest.version")
    bad(edit(m, lambda o: o.update(generator="hyperformer")), w, "unknown adapter generator",
        error=UnknownMethodError)
    bad(edit(m, lambda o: o["config"].update(lora_rank="2")), w, "valid integer",
        "manifest.config.lora_rank")
    bad(edit(m, lambda o: o.update(tasks=["t1", "t1"])), w, "distinct", "manifest.tasks")
    bad(edit(m, lambda o: o.update(tasks=["t1"])), w, "not claimed", "task.t0")
    bad(edit(m, lambda o: o.update(tasks=["t1", "t0", "t2"])), w, "missing", "task.t2")
    bad(edit(m, lambda o: o.pop("tasks")), w, "missing field", "manifest.tasks")
    bad(m, st_save({k: v for k, v in tensors.items() if k != "hypernet.projector.in.bias"}),
        "missing", "hypernet.projector.in.bias")
    bad(m, st_save({**tensors, "hypernet.extra": torch.zeros(1)}), "not claimed",
        "hypernet.extra")
    name = "hypernet.position_embedding"
    bad(m, st_save({**tensors, name: torch.zeros(2, 2)}), "shape", name)
    bad(m, st_save({**tensors, "task.t0": torch.full_like(tensors["task.t0"], float("nan"))}),
        "NaN", "task.t0")
    bad(edit(m, lambda o: o.update(tasks=["t1", "../t0"])),
        st_save({**{k: v for k, v in tensors.items() if k != "task.t0"},
                 "task.../t0": tensors["task.t0"]}), "task name")


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(AdapterValidationError, match=r"no manifest\.json"):
        art.load(tmp_path)
