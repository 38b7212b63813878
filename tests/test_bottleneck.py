"""Bottleneck adapter layers: reference against an independent nn.Sequential construction,
segment/gather execution in the pool, padding, validation and non-mergeability."""

from __future__ import annotations

from collections.abc import Iterator
from typing import get_args

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from tessera.adapters import (
    AdapterValidationError,
    NotMergeableError,
    PoolConfig,
    SlotPool,
    merged_model,
    reference_model,
    registry,
)
from tessera.adapters import targets as tg
from tessera.adapters.banks.bottleneck import Activation, BottleneckBank
from tessera.adapters.method import Adapter, Component, Limits
from tessera.adapters.validation import validate_component
from tests.factories.bottleneck import make_bottleneck_adapter
from tests.helpers import assert_close_scaled, logits, pool_logits
from tests.models import input_ids, tiny_model

ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
METHOD = registry.get("bottleneck")


def sequential(tensors: dict[str, torch.Tensor], act: str) -> nn.Sequential:
    """The adapter body as torch modules, built from the raw tensors."""
    k, out = tensors["down_weight"].shape
    down, up = nn.Linear(out, k), nn.Linear(k, out)
    with torch.no_grad():
        down.weight.copy_(tensors["down_weight"])
        down.bias.copy_(tensors["down_bias"])
        up.weight.copy_(tensors["up_weight"])
        up.bias.copy_(tensors["up_bias"])
    return nn.Sequential(down, ACTS[act](), up)


@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("layer_norm", [False, True])
def test_reference_output_matches_sequential(act: str, layer_norm: bool) -> None:
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(3)
    adapter = make_bottleneck_adapter(model, gen, dim=5, act=act,  # type: ignore[arg-type]
                                      layer_norm=layer_norm, eps=1e-4)
    (component,) = adapter.components
    target = tg.discover(model)["model.layers.1.mlp.down_proj"]
    tensors = component.modules[target.path]
    h = torch.randn(9, target.out_features, generator=gen)  # [N, out]
    z = sequential(dict(tensors), act)(h)
    if layer_norm:
        mean = z.mean(-1, keepdim=True)
        var = ((z - mean) ** 2).mean(-1, keepdim=True)
        z = (z - mean) / torch.sqrt(var + 1e-4) * tensors["ln_weight"] + tensors["ln_bias"]
    want = h + z
    got = METHOD.reference_output(component.config, tensors, target, h)
    assert_close_scaled(got, want, 1e-6, "reference_output")
    assert (got - h).abs().max() > 1e-2  # the adapter does something


def test_reference_runs_the_base_layer_first() -> None:
    model = tiny_model("gpt2")
    adapter = make_bottleneck_adapter(model, torch.Generator().manual_seed(4), dim=3)
    (component,) = adapter.components
    path = "transformer.h.0.attn.c_proj"
    module, target = model.get_submodule(path), tg.discover(model)[path]
    x = torch.randn(4, target.in_features)
    with torch.no_grad():
        want = METHOD.reference_output(component.config, component.modules[path], target,
                                       module(x))
        got = METHOD.reference(component.config, component.modules[path], target,
                               tg.weight_of(module), tg.bias_of(module), x)
    assert_close_scaled(got, want, 1e-6)


@pytest.fixture
def gather_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    calls: list[int] = []
    original = BottleneckBank.apply_tokens

    def spy(self: BottleneckBank, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(BottleneckBank, "apply_tokens", spy)
    yield calls


def run_pool(model: nn.Module, adapters: list[Adapter], slots: list[int]
             ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    ids = input_ids(len(slots), 6)
    refs = [logits(reference_model(model, a), ids) for a in adapters]
    base = logits(model, ids)
    pool = SlotPool(model, PoolConfig(num_slots=4, max_bottleneck_dim=16,
                                      gather_budget=1 << 40))
    for slot, adapter in enumerate(adapters):
        pool.load(slot, adapter)
    return pool_logits(pool, model, ids, slots), refs, base


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mixed_activations_and_layer_norm_fall_back_to_segment(
        family: str, gather_calls: list[int]) -> None:
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(5)
    adapters = [make_bottleneck_adapter(model, gen, dim=4, act="relu", layer_norm=True),
                make_bottleneck_adapter(model, gen, dim=6, act="tanh", layer_norm=False),
                make_bottleneck_adapter(model, gen, dim=2, act="silu", layer_norm=True,
                                        eps=1e-3)]
    slots = [0, 1, -1, 2, 1, 0]
    mixed, refs, base = run_pool(model, adapters, slots)
    assert not gather_calls  # incompatible metadata: segment mode only
    for row, slot in enumerate(slots):
        want = base[row] if slot < 0 else refs[slot][row]
        assert_close_scaled(mixed[row], want, 1e-5, f"row {row} slot {slot}")


@pytest.mark.parametrize("layer_norm", [False, True])
def test_compatible_slots_use_gather_mode(layer_norm: bool, gather_calls: list[int]) -> None:
    model = tiny_model("qwen2")
    gen = torch.Generator().manual_seed(6)
    adapters = [make_bottleneck_adapter(model, gen, dim=d, act="silu", layer_norm=layer_norm)
                for d in (3, 7)]  # different widths: zero padding up to 7 (and 16)
    slots = [1, -1, 0, 1]
    mixed, refs, base = run_pool(model, adapters, slots)
    assert gather_calls
    for row, slot in enumerate(slots):
        want = base[row] if slot < 0 else refs[slot][row]
        assert_close_scaled(mixed[row], want, 1e-5, f"row {row} slot {slot}")


def test_gather_mode_never_serves_a_replaced_adapter(gather_calls: list[int]) -> None:
    """The stacked D / U^T of the active slots are kept between forwards and dropped when
    a slot is written: after replacing slot 1 (another width) rows match the new adapter."""
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(8)
    adapters = [make_bottleneck_adapter(model, gen, dim=d, act="gelu", layer_norm=True)
                for d in (3, 5, 6)]
    ids = input_ids(4, 6)
    slots = [1, 0, -1, 1]
    pool = SlotPool(model, PoolConfig(num_slots=2, max_bottleneck_dim=8))
    pool.load(0, adapters[0])
    pool.load(1, adapters[1])
    bank = pool.banks()["model.layers.0.mlp.down_proj"]["bottleneck"]
    assert isinstance(bank, BottleneckBank)
    base = logits(model, ids)
    for replaced in (False, True):
        if replaced:
            pool.load(1, adapters[2])
            assert not bank.stacks.entries  # the write dropped the stack holding slot 1
        refs = [logits(reference_model(model, adapters[i]), ids)
                for i in (0, 2 if replaced else 1)]
        for _ in range(2):  # built, then served from the cache
            mixed = pool_logits(pool, model, ids, slots)
            for row, slot in enumerate(slots):
                want = base[row] if slot < 0 else refs[slot][row]
                assert_close_scaled(mixed[row], want, 1e-5, f"row {row} slot {slot}")
        assert list(bank.stacks.entries) == [(0, 1)] and bank.stacks.hits >= 1
    assert gather_calls  # gather mode throughout (the default budget admits the stacks)


def test_bank_meta_and_can_gather() -> None:
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(7)
    pool = SlotPool(model, PoolConfig(num_slots=3, max_bottleneck_dim=8))
    pool.load(0, make_bottleneck_adapter(model, gen, dim=2, act="gelu", layer_norm=True))
    pool.load(1, make_bottleneck_adapter(model, gen, dim=2, act="gelu", layer_norm=True))
    pool.load(2, make_bottleneck_adapter(model, gen, dim=2, act="gelu", layer_norm=True,
                                         eps=1e-3))
    bank = pool.banks()["model.layers.0.self_attn.o_proj"]["bottleneck"]
    assert isinstance(bank, BottleneckBank)
    assert bank.slot_meta[0] == {"activation": "gelu", "layer_norm": True, "eps": 1e-5}
    assert bank.can_gather([0, 1]) and not bank.can_gather([0, 2])
    pool.evict(0)
    assert bank.slot_meta[0] == {} and bool((bank.t["down"][0] == 0).all())
    assert bool((bank.t["ln_weight"][0] == 1).all())
    q_bank = pool.banks()["model.layers.0.self_attn.q_proj"]["bottleneck"]
    assert not q_bank.occupied  # only the targeted modules hold the adapter


def test_not_mergeable_but_merged_model_keeps_it_on_reference() -> None:
    model = tiny_model("mistral")
    adapter = make_bottleneck_adapter(model, torch.Generator().manual_seed(8), dim=4)
    (component,) = adapter.components
    assert not METHOD.mergeable
    path = next(iter(component.modules))
    target = tg.discover(model)[path]
    weight = tg.weight_of(model.get_submodule(path))
    with pytest.raises(NotMergeableError):
        METHOD.merge(component.config, component.modules[path], target, weight, None)
    ids = input_ids(2, 5)
    assert_close_scaled(logits(merged_model(model, adapter), ids),
                        logits(reference_model(model, adapter), ids), 1e-6)


def test_validation_rules() -> None:
    model = tiny_model("llama")
    available = tg.discover(model)
    gen = torch.Generator().manual_seed(9)
    adapter = make_bottleneck_adapter(model, gen, dim=5, layer_norm=True)
    (good,) = adapter.components
    validate_component(good, available, Limits())
    with pytest.raises(AdapterValidationError, match="exceeds the limit") as err:
        validate_component(good, available, Limits(max_bottleneck_dim=4))
    assert err.value.tensor is not None and err.value.tensor.endswith("down_weight")
    # layer_norm=False: the LN tensors are unexpected
    no_ln = Component("bottleneck", good.config.model_copy(update={"layer_norm": False}),
                      good.modules)
    with pytest.raises(AdapterValidationError, match="unexpected tensor"):
        validate_component(no_ln, available, Limits())
    # a missing LN tensor
    path = next(iter(good.modules))
    broken = dict(good.modules)
    broken[path] = {k: v for k, v in good.modules[path].items() if k != "ln_bias"}
    with pytest.raises(AdapterValidationError, match="missing tensor") as err:
        validate_component(Component("bottleneck", good.config, broken), available, Limits())
    assert err.value.tensor == f"{path}.ln_bias"


@pytest.mark.parametrize("raw", [
    {"dim": 4, "activation": "sigmoid", "target_modules": ["o_proj"]},  # act(0) != 0
    {"dim": 0, "target_modules": ["o_proj"]},
    {"dim": 4, "layer_norm_eps": 0.0, "target_modules": ["o_proj"]},
    {"dim": 4, "target_modules": ["o_proj"], "reduction_factor": 16},
    {"dim": "4", "target_modules": ["o_proj"]},
])
def test_config_is_strict(raw: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        METHOD.parse_config(raw)


def test_allowed_activations_keep_padding_exact() -> None:
    zero = torch.zeros(3)
    assert set(get_args(Activation)) == set(ACTS)
    for name in get_args(Activation):
        module = ACTS[name]()
        assert torch.equal(module(zero), zero)
        assert torch.equal(F.layer_norm(zero, (3,), eps=1e-5), zero)
