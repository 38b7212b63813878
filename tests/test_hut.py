"""HUT: identity init, the Hadamard identity behind the batched path, and merging a shift
into a bias the base lacks. Expected values are built densely in plain torch here."""

from __future__ import annotations

import pytest
import torch

from tessera.adapters import (
    PoolConfig,
    SlotPool,
    kernels,
    merged_model,
    merged_weights,
    reference_model,
)
from tessera.adapters import targets as tg
from tessera.adapters.banks import hadamard
from tessera.adapters.banks.affine import AffineBank
from tessera.adapters.banks.hadamard import HadamardBank
from tessera.adapters.method import Adapter, Component, Limits, SlotData
from tessera.adapters.methods.hut import HutConfig
from tessera.adapters.plan import Routing
from tessera.adapters.targets import TargetInfo
from tessera.engine.settings import EngineSettings
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


def test_stacked_form_runs_on_the_base_layers_packed_weight() -> None:
    """The W0 GEMM of the stacked form on the oneDNN weight the base layer runs (the pool
    hands each bank its layer): the same delta as the dense construction, in fp32."""
    out_f, in_f, r = 48, 40, 3
    linear = torch.nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        linear.weight.copy_(rand(out_f, in_f, seed=1))
    packed = kernels.PackedLinear(linear)
    w0 = linear.weight.detach()  # [out, in]
    a, c = rand(r, out_f, seed=2), rand(r, in_f, seed=3)
    x = rand(5, in_f, seed=4)
    target = TargetInfo("m.proj", in_f, out_f, "linear", False)
    bank = HadamardBank(3, target, Limits(max_rank=4), torch.float32, torch.device("cpu"),
                        base_layer=packed)
    assert bank.w0_packed is packed.packed
    bank.write(1, SlotData({"a": a, "c": c}))
    bank.write(0, SlotData({"a": a[:2], "c": c[:2]}))
    slots = torch.tensor([1, 0, -1, 1, 0])
    want = torch.zeros(5, out_f, dtype=torch.float64)
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            k = r if slot == 1 else 2
            want[i] = x[i].double() @ dense_delta(w0.double(), a[:k].double(),
                                                  c[:k].double()).t()
    h = torch.zeros(5, out_f)
    for got in (bank.apply_tokens(Routing(slots, 3, 1 << 30), [0, 1], h, x, w0),
                bank.apply(h.clone(), x, w0, Routing(slots, 3, 0))):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_the_pool_hands_each_bank_its_base_layer() -> None:
    model = tiny_model("llama")
    kernels.pack_linears(model)
    pool = SlotPool(model, PoolConfig(num_slots=2, max_rank=4, methods=["hut"]))
    for layer in pool.layers.values():
        assert layer.packed is not None
        assert layer.by_kind["hadamard"].base_layer is layer.base


def dense_delta(w0: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``W0 ⊙ sum_j a_j c_j^T`` term by term, in plain torch."""
    dense = torch.zeros_like(w0)
    for j in range(a.shape[0]):
        dense += w0 * torch.outer(a[j], c[j])
    return dense  # [out, in]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # fp32: oneDNN-packed D
@pytest.mark.parametrize("dense_slots", [None, 0, 1])
def test_dense_and_stacked_forms_match_the_dense_construction(
        dtype: torch.dtype, dense_slots: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every slot through its cached ``D`` (None), none (0), or the first slot used only
    (1: the other runs the stacked form, nothing is evicted); a write drops the slot's
    ``D``. Segment mode (views and gathers) and gather mode against plain torch."""
    monkeypatch.setattr(hadamard, "DENSE_MIN_TOKENS", 1)  # any slot may take its D
    out_f, in_f = 12, 10
    w0 = rand(out_f, in_f, seed=11).to(dtype)
    factors = {s: (rand(r, out_f, seed=12 + s).to(dtype), rand(r, in_f, seed=20 + s).to(dtype))
               for s, r in ((0, 3), (1, 2), (2, 4))}
    target = TargetInfo("m.proj", in_f, out_f, "linear", False)
    bank = HadamardBank(4, target, Limits(max_rank=4), dtype, torch.device("cpu"),
                        dense_slots=dense_slots)
    for s, (a, c) in factors.items():
        bank.write(s, SlotData({"a": a, "c": c}))
    x, h = rand(9, in_f, seed=30).to(dtype), rand(9, out_f, seed=31).to(dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}

    def check(slots: list[int], budget: int) -> None:
        want = h.clone()
        for i, s in enumerate(slots):
            if s in factors:
                want[i] += dense_delta(w0, *factors[s]) @ x[i]
        with torch.no_grad():
            got = bank.apply(h.clone(), x, w0, Routing(torch.tensor(slots), 4, budget))
        torch.testing.assert_close(got, want, **tol)

    prefill = [0, 0, 0, 1, 1, 2, 2, 2, -1]  # runs: views
    decode = [0, 1, 2, 0, 1, 2, 3, 0, 1]  # scattered: gathers (slot 3 empty)
    for slots in (prefill, decode, [2] * 9):
        for budget in (0, 1 << 30):
            check(slots, budget)
    cached = {key[0] for key in bank.dense.entries}
    assert cached == {None: {0, 1, 2}, 0: set(), 1: {0}}[dense_slots]
    assert bank.derived_nbytes() == len(cached) * out_f * in_f * w0.element_size()
    assert all(d.packed == (dtype == torch.float32) for d in bank.dense.entries.values())
    a, c = rand(1, out_f, seed=40).to(dtype), rand(1, in_f, seed=41).to(dtype)
    bank.write(0, SlotData({"a": a, "c": c}))  # a new adapter in slot 0: its D is dropped
    assert (0,) not in bank.dense.entries
    assert bank.derived_nbytes() == len(cached - {0}) * out_f * in_f * w0.element_size()
    factors[0] = (a, c)
    check(decode, 0)
    check(prefill, 1 << 30)


def test_only_slots_with_tokens_enough_take_their_dense_form() -> None:
    """``n r >= DENSE_MIN_TOKENS``: one slot on most tokens of a decode batch takes ``D``, the
    strays share the stacked GEMM (gather mode) or run it alone (segment mode)."""
    out_f, in_f, n = 8, 6, 4 * hadamard.DENSE_MIN_TOKENS
    w0 = rand(out_f, in_f, seed=60)
    factors = {s: (rand(r, out_f, seed=61 + s), rand(r, in_f, seed=65 + s))
               for s, r in ((0, 2), (1, 3), (2, 1))}
    target = TargetInfo("m.proj", in_f, out_f, "linear", False)
    slots = [1 if i % 16 == 3 else 2 if i % 16 == 9 else 0 for i in range(n)]  # 0: 7/8
    x, h = rand(n, in_f, seed=70), rand(n, out_f, seed=71)
    want = h.clone()
    for i, s in enumerate(slots):
        want[i] += dense_delta(w0, *factors[s]) @ x[i]
    for budget in (0, 1 << 30):
        bank = HadamardBank(3, target, Limits(max_rank=4), torch.float32, torch.device("cpu"))
        for s, (a, c) in factors.items():
            bank.write(s, SlotData({"a": a, "c": c}))
        with torch.no_grad():
            got = bank.apply(h.clone(), x, w0, Routing(torch.tensor(slots), 3, budget))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert list(bank.dense.entries) == [(0,)]


def test_the_dense_form_is_not_taken_where_autograd_needs_a_backward() -> None:
    out_f, in_f = 6, 5
    w0 = rand(out_f, in_f, seed=50)
    a, c = rand(2, out_f, seed=51), rand(2, in_f, seed=52)
    bank = HadamardBank(1, TargetInfo("m.proj", in_f, out_f, "linear", False),
                        Limits(max_rank=2), torch.float32, torch.device("cpu"))
    bank.write(0, SlotData({"a": a, "c": c}))
    n = hadamard.DENSE_MIN_TOKENS  # tokens enough for D without autograd
    x = rand(n, in_f, seed=53).requires_grad_()
    bank.apply_slot(0, torch.zeros(n, out_f), x, w0).sum().backward()
    assert not bank.dense.entries  # the stacked form ran: D is built without a graph
    want = dense_delta(w0, a, c).sum(dim=0).expand(n, in_f)  # d/dx of sum(D x)
    assert x.grad is not None
    torch.testing.assert_close(x.grad, want)


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


def test_the_dense_cap_reaches_every_hadamard_bank_from_the_settings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_DENSE_SLOTS", "1")
    config = EngineSettings().pool_config()
    assert config.dense_slots == 1
    pool = SlotPool(tiny_model("llama"), config.model_copy(update={"num_slots": 3}))
    caps = {b.dense.max_entries for banks in pool.banks().values() for b in banks.values()
            if isinstance(b, HadamardBank)}
    assert caps == {1}
    default = SlotPool(tiny_model("llama"), PoolConfig(num_slots=12))
    assert {b.dense.max_entries for banks in default.banks().values()
            for b in banks.values() if isinstance(b, HadamardBank)} == {8}  # bounded


def test_a_dense_weight_that_finds_no_memory_falls_back_to_the_stacked_form(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA out of memory while building D (raised here: no GPU) costs speed, not the batch."""
    out_f, in_f, n = 6, 5, hadamard.DENSE_MIN_TOKENS
    w0 = rand(out_f, in_f, seed=80)
    a, c = rand(2, out_f, seed=81), rand(2, in_f, seed=82)
    bank = HadamardBank(1, TargetInfo("m.proj", in_f, out_f, "linear", False),
                        Limits(max_rank=2), torch.float32, torch.device("cpu"))
    bank.write(0, SlotData({"a": a, "c": c}))

    def no_memory(slot: int, weight: torch.Tensor) -> hadamard.Dense:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(bank, "build_dense", no_memory)
    x, h = rand(n, in_f, seed=83), rand(n, out_f, seed=84)
    with torch.no_grad():
        got = bank.apply_slot(0, h, x, w0)
    torch.testing.assert_close(got, h + x @ dense_delta(w0, a, c).t())
    assert not bank.dense.entries
