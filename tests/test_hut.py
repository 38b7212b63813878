"""HUT: identity init, the Hadamard identity behind the batched path, and merging a shift
into a bias the base lacks. Expected values are built densely in plain torch here."""

from __future__ import annotations

import pytest
import torch

from tessera.adapters import PoolConfig, SlotPool, merged_model, merged_weights, reference_model
from tessera.adapters import targets as tg
from tessera.adapters.banks.affine import AffineBank
from tessera.adapters.banks.hadamard import HadamardBank
from tessera.adapters.method import Adapter, Component, Limits, SlotData
from tessera.adapters.methods.hut import HutConfig
from tessera.adapters.plan import Routing
from tessera.adapters.targets import TargetInfo
from tests.helpers import assert_close_scaled, logits, pool_logits
from tests.models import FAMILIES, input_ids, tiny_model

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "c_attn", "c_fc"]


def rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def hut_adapter(model: torch.nn.Module, config: HutConfig, *, identity: bool,
                seed: int = 0) -> Adapter:
    available = tg.discover(model)
    modules = {}
    for i, path in enumerate(tg.resolve(config.target_modules, available)):
        t = available[path]
        s = seed * 1000 + 10 * i
        m_a = rand(t.out_features, config.r, seed=s, scale=0.5)
        if identity:  # the documented init: M_B = 0, gamma = 1, beta = 0 (M_A random)
            m_b, gamma, beta = (torch.zeros(config.r, t.in_features),
                                torch.ones(t.in_features), torch.zeros(t.in_features))
        else:
            m_b = rand(config.r, t.in_features, seed=s + 1, scale=0.5)
            gamma = 1.0 + rand(t.in_features, seed=s + 2, scale=0.2)
            beta = rand(t.in_features, seed=s + 3, scale=0.1)
        modules[path] = {"hut_A": m_a, "hut_B": m_b, "hut_gamma": gamma, "hut_beta": beta}
    return Adapter((Component("hut", config, modules),))


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_init_gives_the_base_output_exactly(family: str) -> None:
    model = tiny_model(family)
    adapter = hut_adapter(model, HutConfig(r=3, alpha=5.0, target_modules=TARGETS),
                          identity=True)
    ids = input_ids(3, 6)
    base = logits(model, ids)
    assert torch.equal(logits(reference_model(model, adapter), ids), base)
    assert torch.equal(logits(merged_model(model, adapter), ids), base)
    for budget in (0, 1 << 40):  # segment, then gather mode
        pooled = tiny_model(family)  # the same seeded weights, wrapped by this pool
        pool = SlotPool(pooled, PoolConfig(num_slots=2, max_rank=4, gather_budget=budget))
        pool.load(0, adapter)
        pool.load(1, adapter)
        with pool.use(torch.tensor([0, -1, 1])):
            mixed = logits(pooled, ids)
        if family in ("llama", "mistral"):  # bias-free: the very same GEMM as the base
            assert torch.equal(mixed, base)
        else:  # W0 x then + b in the layer, fused addmm in the base: rounding only
            assert_close_scaled(mixed, base, 1e-6, "identity init through the pool")


def test_hadamard_identity_against_dense_construction() -> None:
    """(W0 ⊙ a c^T) x = a ⊙ W0 (c ⊙ x), summed over terms, through the bank."""
    out_f, in_f, r = 7, 5, 3
    w0 = rand(out_f, in_f, seed=1).double()
    a, c = rand(r, out_f, seed=2).double(), rand(r, in_f, seed=3).double()
    x = rand(4, in_f, seed=4).double()
    dense = torch.zeros(out_f, in_f, dtype=torch.float64)
    for j in range(r):
        dense += w0 * torch.outer(a[j], c[j])  # W0 ⊙ a_j c_j^T
    want_delta = x @ dense.t()  # [4, out]

    target = TargetInfo("m.proj", in_f, out_f, "linear", False)
    bank = HadamardBank(3, target, Limits(max_rank=4), torch.float64, torch.device("cpu"))
    bank.write(1, SlotData({"a": a, "c": c}))
    bank.write(0, SlotData({"a": a[:1], "c": c[:1]}))
    h = rand(4, out_f, seed=5).double()
    torch.testing.assert_close(bank.apply_slot(1, h, x, w0), h + want_delta)
    slots = torch.tensor([1, -1, 0, 2])  # slot 2 empty
    want = h.clone()
    want[0] += want_delta[0]
    want[2] += x[2] @ (w0 * torch.outer(a[0], c[0])).t()
    routing = Routing(slots, 3, 1 << 30)
    torch.testing.assert_close(bank.apply_tokens(routing, [0, 1], h, x, w0), want)
    torch.testing.assert_close(bank.apply(h, x, w0, Routing(slots, 3, 0)), want)


def test_affine_bank_leaves_null_and_other_rows_alone() -> None:
    target = TargetInfo("m.proj", 5, 7, "linear", False)
    bank = AffineBank(2, target, Limits(), torch.float32, torch.device("cpu"))
    gamma, beta = rand(5, seed=6), rand(5, seed=7)
    bank.write(1, SlotData({"gamma": gamma, "beta": beta}))
    x = rand(3, 5, seed=8)
    before = x.clone()
    slots = torch.tensor([1, -1, 0])
    want = x.clone()
    want[0] = gamma * x[0] + beta
    for budget in (0, 1 << 30):
        got = bank.apply(x, x, torch.empty(0), Routing(slots, 2, budget))
        torch.testing.assert_close(got, want)
        assert torch.equal(got[1:], x[1:]) and torch.equal(x, before)  # input untouched


def test_merge_adds_a_bias_to_a_bias_free_llama() -> None:
    model = tiny_model("llama")
    config = HutConfig(r=2, alpha=3.0, target_modules=["q_proj", "down_proj"])
    adapter = hut_adapter(model, config, identity=False, seed=3)
    merged = merged_weights(model, adapter)
    s = 3.0 / 2  # alpha / r
    for path, tensors in adapter.components[0].modules.items():
        w0 = tg.weight_of(model.get_submodule(path)).detach()
        assert model.get_submodule(path).bias is None
        w_h = w0 * (1 + s * tensors["hut_A"] @ tensors["hut_B"])
        new_w, new_b = merged[path]
        torch.testing.assert_close(new_w, w_h * tensors["hut_gamma"])  # W_h diag(gamma)
        assert new_b is not None
        torch.testing.assert_close(new_b, w_h @ tensors["hut_beta"])  # W_h beta
    ids = input_ids(2, 6)
    ref = logits(reference_model(model, adapter), ids)
    assert (ref - logits(model, ids)).abs().max() > 1e-3
    assert_close_scaled(logits(merged_model(model, adapter), ids), ref, 1e-5, "merged")
    assert model.get_submodule("model.layers.0.self_attn.q_proj").bias is None  # base intact
    pool = SlotPool(model, PoolConfig(num_slots=1, max_rank=2))
    pool.load(0, adapter)
    assert_close_scaled(pool_logits(pool, model, ids, [0, 0]), ref, 1e-5, "pool")


def test_zero_shift_keeps_a_bias_free_layer_bias_free() -> None:
    model = tiny_model("llama")
    config = HutConfig(r=2, target_modules=["q_proj"])
    adapter = hut_adapter(model, config, identity=False, seed=4)
    (component,) = adapter.components
    zero_beta = {p: {**t, "hut_beta": torch.zeros_like(t["hut_beta"])}
                 for p, t in component.modules.items()}
    merged = merged_weights(model, Adapter((Component("hut", config, zero_beta),)))
    assert all(b is None for _, b in merged.values())
