"""SoKA utilities: Van Loan–Pitsianis rearrangement, KPSVD, rank selection, delta export,
and a KPSVD-initialised adapter served from the pool. Expected values are built with
``torch.kron`` and explicit index loops, never with the code under test."""

from __future__ import annotations

import copy

import pytest
import torch

from tessera.adapters import (
    AdapterValidationError,
    PoolConfig,
    SlotPool,
    merged_model,
    reference_model,
)
from tessera.adapters import targets as tg
from tessera.adapters.banks.kron import KronBank, KronFactors, kron_factors
from tessera.adapters.kpsvd import (
    elbow_rank,
    energy_rank,
    export_delta,
    kpsvd,
    rearrange,
    residual_weights,
    soka_init,
)
from tessera.adapters.method import Adapter, Component, Limits, SlotData
from tessera.adapters.methods.soka import SokaConfig
from tessera.adapters.plan import Routing
from tessera.adapters.targets import TargetInfo
from tests.helpers import assert_close_scaled, logits, pool_logits
from tests.models import input_ids, tiny_model

F = KronFactors(3, 2, 4, 5)  # W: [12, 10]


def dense(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale * sum_j kron(a_j, b_j)`` with an explicit loop."""
    out = torch.zeros(a.shape[1] * b.shape[1], a.shape[2] * b.shape[2], dtype=a.dtype)
    for j in range(a.shape[0]):
        out += torch.kron(a[j], b[j])
    return scale * out


def loop_rearrange(w: torch.Tensor, f: KronFactors) -> torch.Tensor:
    """R[i n + j, k q + l] = W[i p + k, j q + l], element by element."""
    r = torch.empty(f.m * f.n, f.p * f.q, dtype=w.dtype)
    for i in range(f.m):
        for j in range(f.n):
            for k in range(f.p):
                for ll in range(f.q):
                    r[i * f.n + j, k * f.q + ll] = w[i * f.p + k, j * f.q + ll]
    return r


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


# --- factor rule ---------------------------------------------------------------------------
@pytest.mark.parametrize(("out", "inp", "want"), [
    (32, 32, (4, 4, 8, 8)), (48, 32, (6, 4, 8, 8)), (96, 32, (8, 4, 12, 8)),
    (32, 128, (4, 8, 8, 16)), (16, 32, (4, 4, 4, 8)), (7, 12, (1, 3, 7, 4)),
])
def test_kron_factor_rule_is_most_square(out: int, inp: int,
                                         want: tuple[int, int, int, int]) -> None:
    assert tuple(kron_factors(out, inp)) == want


# --- rearrangement and KPSVD ------------------------------------------------------------
def test_rearrangement_maps_kron_to_rank_one() -> None:
    a, b = rand(F.m, F.n, seed=1), rand(F.p, F.q, seed=2)
    r = rearrange(torch.kron(a, b), F)
    torch.testing.assert_close(r, torch.outer(a.flatten(), b.flatten()))


def test_rearrangement_matches_index_definition() -> None:
    w = rand(F.m * F.p, F.n * F.q, seed=3)
    torch.testing.assert_close(rearrange(w, F), loop_rearrange(w, F))


def test_full_rank_kpsvd_reconstructs_w0() -> None:
    w = rand(F.m * F.p, F.n * F.q, seed=4)
    terms = kpsvd(w, F)
    assert terms.a.shape == (6, F.m, F.n) and terms.b.shape == (6, F.p, F.q)
    torch.testing.assert_close(dense(terms.a, terms.b), w, rtol=0, atol=1e-10)


@pytest.mark.parametrize("r", [1, 2, 4])
def test_truncation_error_is_discarded_energy(r: int) -> None:
    w = rand(F.m * F.p, F.n * F.q, seed=5)
    sigma = torch.linalg.svdvals(loop_rearrange(w, F))  # independent spectrum
    terms = kpsvd(w, F)
    torch.testing.assert_close(terms.sigma, sigma)
    a, b = terms.truncate(r)
    err = (w - dense(a, b)).square().sum()
    torch.testing.assert_close(err, sigma[r:].square().sum())


# --- rank selection -------------------------------------------------------------------------
@pytest.mark.parametrize(("tau", "want"), [(0.5, 1), (0.72, 1), (0.73, 2), (0.9, 2),
                                           (0.91, 3), (0.95, 3), (0.96, 4), (1.0, 4)])
def test_energy_rank(tau: float, want: int) -> None:
    # energies 16, 4, 1, 1 of 22: cumulative shares 0.727, 0.909, 0.955, 1
    assert energy_rank(torch.tensor([4.0, 2.0, 1.0, 1.0]), tau) == want


def test_energy_rank_rejects_bad_tau() -> None:
    with pytest.raises(ValueError, match="tau"):
        energy_rank(torch.tensor([1.0]), 0.0)


@pytest.mark.parametrize(("sigma", "want"), [
    ([10.0, 9.0, 8.0, 1.0, 0.9, 0.8], 3),  # the drop after three strong terms
    ([10.0, 1.0, 1.0, 1.0, 1.0], 1),  # one dominant term
    ([10.0, 6.0, 3.0, 2.0, 1.5, 1.2, 1.0], 2),  # largest gap below the chord at k = 2
    ([5.0, 4.0, 3.0, 2.0, 1.0], 5),  # linear: no knee, keep all
    ([3.0, 1.0], 2),  # no interior point
])
def test_elbow_rank(sigma: list[float], want: int) -> None:
    assert elbow_rank(torch.tensor(sigma)) == want


# --- the kron bank against dense torch.kron ---------------------------------------------------
def test_kron_bank_segment_and_gather_match_dense() -> None:
    target = TargetInfo("x.proj", 10, 12, "linear", False)  # in 10, out 12
    f = kron_factors(12, 10)
    bank = KronBank(3, target, Limits(max_rank=4), torch.float64, torch.device("cpu"))
    a1, b1 = rand(2, f.m, f.n, seed=6), rand(2, f.p, f.q, seed=7)
    a2, b2 = rand(4, f.m, f.n, seed=8), rand(4, f.p, f.q, seed=9)
    bank.write(0, SlotData({"A": a1, "B": b1}))
    bank.write(2, SlotData({"A": a2, "B": b2}))
    x = rand(5, 10, seed=10)
    h = rand(5, 12, seed=11)
    terms = {0: (a1, b1), 2: (a2, b2)}
    # scattered tokens (slot 1 empty, -1 base), then runs (segment mode's in-place spans)
    for layout in ([2, 0, -1, 2, 1], [0, 0, 0, 2, 2], [-1, 2, 2, 2, 2]):
        slots = torch.tensor(layout)
        want = h.clone()
        for row, slot in enumerate(layout):
            if slot in terms:
                want[row] += dense(*terms[slot]) @ x[row]
        routing = Routing(slots, 3, 1 << 30)
        active = [s for s in (0, 2) if s in layout]
        torch.testing.assert_close(bank.apply_tokens(routing, active, h, x, torch.empty(0)),
                                   want)
        torch.testing.assert_close(bank.apply(h.clone(), x, torch.empty(0),
                                              Routing(slots, 3, 0)), want)


# --- delta export ----------------------------------------------------------------------------
def soka_component(a: torch.Tensor, b: torch.Tensor, scale: float) -> Component:
    config = SokaConfig(r=int(a.shape[0]), scale=scale, target_modules=["proj"])
    return Component("soka", config, {"m.proj": {"soka_A": a, "soka_B": b}})


@pytest.mark.parametrize("compress", [False, True])
def test_export_delta_is_against_the_original_w0(compress: bool) -> None:
    w0 = rand(F.m * F.p, F.n * F.q, seed=12)
    ai, bi = rand(3, F.m, F.n, seed=13), rand(3, F.p, F.q, seed=14)
    # trained = the init terms moved a little plus two new terms
    at = torch.cat([ai + 0.1 * rand(3, F.m, F.n, seed=15), rand(2, F.m, F.n, seed=16)])
    bt = torch.cat([bi, rand(2, F.p, F.q, seed=17)])
    init, trained = soka_component(ai, bi, 0.5), soka_component(at, bt, 2.0)
    exported = export_delta(init, trained, compress=compress)
    t = exported.modules["m.proj"]
    config = exported.config
    assert isinstance(config, SokaConfig)
    served = w0 + dense(t["soka_A"], t["soka_B"], config.scale)
    trained_run = (w0 - dense(ai, bi, 0.5)) + dense(at, bt, 2.0)
    torch.testing.assert_close(served, trained_run, rtol=0, atol=1e-9)
    assert config.rank_of("m.proj") == t["soka_A"].shape[0]
    if compress:  # delta = (1.5 a_i + 0.2 e_i) ⊗ b_i (3 terms) + 2 new terms: rank <= 5
        assert t["soka_A"].shape[0] <= 5
    else:
        assert t["soka_A"].shape[0] == 8


def test_export_delta_compress_finds_the_true_rank() -> None:
    ai, bi = rand(3, F.m, F.n, seed=18), rand(3, F.p, F.q, seed=19)
    extra_a, extra_b = rand(1, F.m, F.n, seed=20), rand(1, F.p, F.q, seed=21)
    trained = soka_component(torch.cat([ai, extra_a]), torch.cat([bi, extra_b]), 1.0)
    exported = export_delta(soka_component(ai, bi, 1.0), trained, compress=True)
    a, b = exported.modules["m.proj"]["soka_A"], exported.modules["m.proj"]["soka_B"]
    assert a.shape[0] == 1  # only the new term survives
    torch.testing.assert_close(dense(a, b), torch.kron(extra_a[0], extra_b[0]))


# --- a KPSVD-initialised adapter on a tiny model ----------------------------------------------
TARGETS = ["q_proj", "o_proj", "up_proj"]


def test_kpsvd_init_adapter_loads_and_matches_reference() -> None:
    model = tiny_model("llama")
    adapter = soka_init(model, TARGETS, rule="energy", tau=0.5, max_rank=8, scale=0.5)
    (component,) = adapter.components
    config = component.config
    assert isinstance(config, SokaConfig) and config.selection is not None
    assert config.selection.rule == "energy" and config.selection.tau == 0.5
    available = tg.discover(model)
    for path, tensors in component.modules.items():
        w0 = tg.weight_of(model.get_submodule(path)).detach().double()
        f = kron_factors(*w0.shape)
        assert config.factors[path] == list(f)
        sigma = torch.linalg.svdvals(loop_rearrange(w0, f))
        share = sigma.square().cumsum(0) / sigma.square().sum()
        energy = int((share < 0.5).sum()) + 1  # smallest r with share >= tau
        assert config.selection.energy_rank[path] == energy
        r = tensors["soka_A"].shape[0]
        assert config.rank_of(path) == r == min(energy, 8)  # capped at max_rank
        approx = dense(tensors["soka_A"].double(), tensors["soka_B"].double(), 0.5)
        err = (w0 - approx).square().sum()
        torch.testing.assert_close(err, sigma[r:].square().sum(), rtol=1e-4, atol=1e-8)
        assert path in available

    ids = input_ids(3, 6)
    ref = logits(reference_model(model, adapter), ids)
    base = logits(model, ids)
    assert (ref - base).abs().max() > 1e-3
    assert_close_scaled(logits(merged_model(model, adapter), ids), ref, 1e-5, "merged")
    pool = SlotPool(model, PoolConfig(num_slots=2, max_rank=8))
    pool.load(1, adapter)
    mixed = pool_logits(pool, model, ids, [1, -1, 1])
    assert_close_scaled(mixed[0], ref[0], 1e-5, "pool row 0")
    assert_close_scaled(mixed[1], base[1], 1e-5, "pool base row")
    assert_close_scaled(mixed[2], ref[2], 1e-5, "pool row 2")


def test_pissa_like_start_reproduces_the_base() -> None:
    """Residual base (W0 - init) plus the init adapter is the original model."""
    model = tiny_model("gpt2")
    adapter = soka_init(model, ["c_attn", "c_fc"], rule="elbow", max_rank=4)
    residual = residual_weights(model, adapter.components[0])
    shifted = copy.deepcopy(model)
    available = tg.discover(shifted)
    with torch.no_grad():
        for path, weight in residual.items():
            param = shifted.get_submodule(path).weight
            assert isinstance(param, torch.Tensor)
            param.copy_(tg.to_module_layout(weight, available[path].kind))
    ids = input_ids(2, 5)
    assert (logits(shifted, ids) - logits(model, ids)).abs().max() > 1e-3
    assert_close_scaled(logits(reference_model(shifted, adapter), ids), logits(model, ids),
                        1e-5, "residual + init")


# --- factorization mismatch ----------------------------------------------------------------
def test_other_factorization_is_refused() -> None:
    model = tiny_model("llama")
    pool = SlotPool(model, PoolConfig(num_slots=1, max_rank=8))
    path = "model.layers.0.self_attn.q_proj"  # [32, 32]: rule (4, 4, 8, 8)
    config = SokaConfig(r=2, target_modules=[path])
    swapped = {path: {"soka_A": rand(2, 8, 8).float(), "soka_B": rand(2, 4, 4).float()}}
    with pytest.raises(AdapterValidationError, match="does not match the expected") as err:
        pool.load(0, Adapter((Component("soka", config, swapped),)))
    assert err.value.tensor == f"{path}.soka_A"
    declared = config.model_copy(update={"factors": {path: [8, 8, 4, 4]}})
    with pytest.raises(AdapterValidationError, match="differ from tessera's rule"):
        pool.load(0, Adapter((Component("soka", declared, swapped),)))
