"""oneDNN linears on packed weights (tessera.adapters.kernels): the op against plain torch,
a packed model against the unpacked one, every method and the hot merge on a packed base
against the references of the unpacked model, and the engine loading its base packed."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from tessera.adapters import PoolConfig, SlotPool, kernels, reference_model, registry
from tessera.engine import builtin
from tessera.engine.model import load_base
from tests.factories import FACTORIES
from tests.helpers import assert_close_scaled, logits, pool_logits
from tests.live import HermeticSettings
from tests.models import FAMILIES, input_ids, tiny_model

FP32_REL = 2e-5  # summation order only


def test_fp32_is_supported_on_the_cpu_only() -> None:
    assert kernels.supported(torch.float32, "cpu")
    assert not kernels.supported(torch.float32, "cuda")


@pytest.mark.parametrize("rows", [1, 7, 33, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_plain_torch(rows: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(48, 40, generator=gen)  # [out, in]
    b = torch.randn(48, generator=gen) if bias else None  # [out]
    x = torch.randn(rows, 40, generator=gen)  # [n, in]
    want = x @ w.t() + (0 if b is None else b)  # [n, out]
    assert_close_scaled(kernels.linear(x, w, kernels.pack(w), b), want, FP32_REL, "2-D")
    x3 = x.reshape(1, rows, 40)  # [1, n, in]: leading dimensions pass through
    got3 = kernels.linear(x3, w, kernels.pack(w), b)
    assert got3.shape == (1, rows, 48)
    assert_close_scaled(got3[0], want, FP32_REL, "3-D")


def test_gradients_flow_through_a_packed_linear() -> None:
    """The oneDNN op has no backward: where autograd needs one the layer runs F.linear,
    so the input's gradient is W^T g, as through the plain layer."""
    gen = torch.Generator().manual_seed(3)
    plain = nn.Linear(6, 5)
    packed = kernels.PackedLinear(plain)
    x = torch.randn(4, 6, generator=gen, requires_grad=True)
    g = torch.randn(4, 5, generator=gen)
    packed(x).backward(g)
    assert x.grad is not None
    torch.testing.assert_close(x.grad, g @ plain.weight.detach())


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_model_equals_the_unpacked_model(family: str) -> None:
    model, plain = tiny_model(family), tiny_model(family)  # same seeded weights
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    keys = set(model.state_dict())
    tied = {n: m.weight for n, m in model.named_modules() if type(m) is nn.Linear}
    assert kernels.pack_linears(model) == len(linears) > 0
    for name in linears:
        module = model.get_submodule(name)
        assert isinstance(module, kernels.PackedLinear)
        assert module.weight is tied[name]  # the same Parameter: tied weights stay tied
    assert set(model.state_dict()) == keys
    ids = input_ids(3, 9)
    copied = copy.deepcopy(model)  # packs its own copy (what reference_model does)
    assert isinstance(copied.lm_head, kernels.PackedLinear)
    with torch.no_grad():
        want = logits(plain, ids)
        assert_close_scaled(logits(model, ids), want, FP32_REL, family)
        assert_close_scaled(logits(copied, ids), want, FP32_REL, f"{family} copied")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_every_method_on_a_packed_base_equals_its_reference(family: str) -> None:
    """One pool over the packed model, two methods per forward, rows of every method and
    the base: each row equals the reference model of its adapter over the unpacked base
    (DoRA keeps its bias back, the late-bias path)."""
    plain = tiny_model(family)
    gen = torch.Generator().manual_seed(11)
    methods = registry.all_names()
    made = {m: FACTORIES[m](plain, gen) for m in methods}
    for first, second in zip(methods, [*methods[1:], methods[0]], strict=True):
        model = tiny_model(family)
        kernels.pack_linears(model)
        pool = SlotPool(model, PoolConfig(num_slots=2, max_rank=8, max_bottleneck_dim=16))
        assert all(isinstance(layer.base, kernels.PackedLinear)
                   for layer in pool.layers.values() if layer.target.kind == "linear")
        pool.load(0, made[first])
        pool.load(1, made[second])
        slots = [0, 1, -1, 0]
        ids = input_ids(len(slots), 6)
        got = pool_logits(pool, model, ids, slots)
        for row, slot in enumerate(slots):
            ref = plain if slot < 0 else reference_model(plain, made[(first, second)[slot]])
            assert_close_scaled(got[row], logits(ref, ids[row:row + 1])[0], FP32_REL,
                                f"{family} {first}/{second} row {row}")


def test_hot_merge_on_a_packed_base_runs_packed_and_matches_its_reference() -> None:
    model, plain = tiny_model("llama"), tiny_model("llama")
    kernels.pack_linears(model)
    gen = torch.Generator().manual_seed(5)
    hot, other = FACTORIES["lora"](plain, gen), FACTORIES["dora"](plain, gen)
    pool = SlotPool(model, PoolConfig(num_slots=1, max_rank=8))
    pool.load(0, other)
    merge = pool.hot_merge(pool.prepare(hot))
    assert merge and all(delta.packed is not None for delta in merge.values())
    pool.install_hot(merge)
    slots, flags = [-1, 0, -1], [True, False, False]
    ids = input_ids(len(slots), 6)
    with torch.no_grad(), pool.use(torch.tensor(slots), hot=flags):
        got = logits(model, ids)
    for row, adapter in enumerate([hot, other, None]):
        ref = plain if adapter is None else reference_model(plain, adapter)
        assert_close_scaled(got[row], logits(ref, ids[row:row + 1])[0], FP32_REL, f"row {row}")


@pytest.mark.parametrize("packed", [True, False])
def test_the_engine_loads_its_cpu_base_packed_unless_told_not_to(tmp_path: Path,
                                                                 packed: bool) -> None:
    source = builtin.materialise(tmp_path / "model", "random")
    loaded = load_base(HermeticSettings(model=str(source), device="cpu", dtype="float32",
                                        packed_linear=packed))
    linears = [m for m in loaded.model.modules() if isinstance(m, nn.Linear)]
    packed_ones = [m for m in linears if isinstance(m, kernels.PackedLinear)]
    assert loaded.packed_linears == len(packed_ones)
    assert len(packed_ones) == (len(linears) if packed else 0) and linears
