"""SoKA utilities: Kronecker-product SVD (KPSVD), rank selection, init and delta export.

Van Loan–Pitsianis: for ``W [m p, n q]`` the rearrangement
``R(W) = W.reshape(m, p, n, q).permute(0, 2, 1, 3).reshape(m n, p q)`` maps ``A ⊗ B`` to
the rank-one matrix ``vec(A) vec(B)^T`` (row-major vec). So the SVD
``R(W) = sum_k sigma_k u_k v_k^T`` gives ``W = sum_k A_k ⊗ B_k`` with
``A_k = sqrt(sigma_k) u_k`` (as ``[m, n]``) and ``B_k = sqrt(sigma_k) v_k`` (as ``[p, q]``),
and truncating to ``r`` terms is the best Frobenius approximation by r Kronecker terms:
``||W - W_r||_F^2 = sum_{k > r} sigma_k^2``.

Rank per module from the spectrum, both recorded (``RankSelection``), one chosen:
- energy: the smallest ``r`` with ``sum_{k<=r} sigma_k^2 / sum_k sigma_k^2 >= tau``
  (evaluated in float64, with ``1e-12`` slack for rounding so ``tau = 1`` means "all");
- elbow: the chord rule (Kneedle-like). On the curve ``(k, sigma_k)``, ``k = 0..K-1``,
  draw the straight line from the first to the last point; the knee ``k*`` is the interior
  point lying furthest *below* that line (largest vertical gap, which has the same argmax
  as the perpendicular distance), and the rank is ``k*`` — the terms before the drop.
  Without an interior point below the chord (``K <= 2`` or a concave/linear spectrum)
  the rank is ``K``.

Factor shapes always come from :func:`tessera.adapters.banks.kron.kron_factors`, the rule the
pool's banks and the SoKA schema use. Served SoKA weights are terms *added to the frozen
W0*; a PiSSA-like run (trained on base ``W0 - init``) is exported by :func:`export_delta`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from tessera.adapters import targets as tg
from tessera.adapters.banks.kron import KronFactors, kron_factors
from tessera.adapters.method import Adapter, Component
from tessera.adapters.methods.soka import SoKA, SokaConfig
from tessera.adapters.registry import get

Rule = Literal["energy", "elbow", "fixed"]
_ENERGY_SLACK = 1e-12


def rearrange(weight: torch.Tensor, f: KronFactors) -> torch.Tensor:
    """Van Loan–Pitsianis ``R(W)`` ``[m n, p q]`` of ``weight`` ``[m p, n q]``."""
    if tuple(weight.shape) != (f.m * f.p, f.n * f.q):
        raise ValueError(f"weight {list(weight.shape)} does not fit factors {tuple(f)}")
    return weight.reshape(f.m, f.p, f.n, f.q).permute(0, 2, 1, 3).reshape(f.m * f.n,
                                                                          f.p * f.q)


@dataclass(frozen=True)
class Kpsvd:
    """All KPSVD terms of one weight, strongest first."""

    a: torch.Tensor  # [K, m, n]
    b: torch.Tensor  # [K, p, q]
    sigma: torch.Tensor  # [K], K = min(m n, p q)

    def truncate(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``r`` terms ``([r, m, n], [r, p, q])``."""
        return self.a[:r], self.b[:r]


def kpsvd(weight: torch.Tensor, f: KronFactors) -> Kpsvd:
    """``weight = sum_k a_k ⊗ b_k`` (exactly, with all ``K`` terms)."""
    u, sigma, vh = torch.linalg.svd(rearrange(weight, f), full_matrices=False)
    root = sigma.clamp_min(0).sqrt()  # [K]
    a = (u * root).t().reshape(-1, f.m, f.n)  # [K, m, n]: sqrt(sigma_k) u_k
    b = (vh * root.unsqueeze(1)).reshape(-1, f.p, f.q)  # [K, p, q]: sqrt(sigma_k) v_k
    return Kpsvd(a, b, sigma)


def energy_rank(sigma: torch.Tensor, tau: float) -> int:
    """Smallest ``r >= 1`` whose cumulative ``sigma^2`` share reaches ``tau`` (0 < tau <= 1)."""
    if not 0 < tau <= 1:
        raise ValueError(f"tau must lie in (0, 1], got {tau}")
    energy = sigma.double().square()  # [K]
    total = float(energy.sum())
    if total == 0.0:
        return 1
    share = torch.cumsum(energy, 0) / total  # [K]
    reached = torch.nonzero(share >= tau - _ENERGY_SLACK).flatten()
    return int(reached[0]) + 1 if reached.numel() else int(sigma.shape[0])


def elbow_rank(sigma: torch.Tensor) -> int:
    """The chord-rule elbow of a descending spectrum (see the module docstring)."""
    s = sigma.double()  # [K]
    k = int(s.shape[0])
    if k <= 2:
        return k
    steps = torch.arange(k, dtype=torch.float64) / (k - 1)  # [K]
    chord = s[0] + (s[-1] - s[0]) * steps  # [K]
    gap = (chord - s)[1:-1]  # [K - 2]: interior points, positive below the chord
    best = int(torch.argmax(gap))
    if float(gap[best]) <= 0.0:
        return k
    return best + 1  # interior index best + 1 is the knee; keep the terms before it


def select_rank(sigma: torch.Tensor, rule: Rule, *, tau: float, fixed: int,
                max_rank: int) -> tuple[int, int, int]:
    """``(chosen, energy, elbow)`` ranks, the chosen one capped at ``max_rank``."""
    energy, elbow = energy_rank(sigma, tau), elbow_rank(sigma)
    chosen = {"energy": energy, "elbow": elbow, "fixed": fixed}[rule]
    return max(1, min(chosen, max_rank, int(sigma.shape[0]))), energy, elbow


def rank_key(path: str) -> str:
    """A ``rank_pattern`` key matching exactly this module path."""
    return re.escape(path)


def soka_init(model: nn.Module, target_modules: list[str] | str, *, rule: Rule = "energy",
              tau: float = 0.9, fixed_rank: int = 8, max_rank: int = 16,
              scale: float = 1.0) -> Adapter:
    """A SoKA adapter holding each targeted module's leading KPSVD terms, ranks chosen by
    ``rule`` (``scale`` divides the terms so that ``s * sum A ⊗ B`` is the truncated W0).

    Served as-is on the frozen base it *adds* the principal part of W0 again; for
    PiSSA-like training use :func:`residual_weights` as the trainable run's base and
    :func:`export_delta` to produce the servable artifact."""
    if scale == 0:
        raise ValueError("scale must be non-zero")
    available = tg.discover(model)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    ranks: dict[str, int] = {}
    energies: dict[str, int] = {}
    elbows: dict[str, int] = {}
    factors: dict[str, list[int]] = {}
    for path in tg.resolve(target_modules, available):
        target = available[path]
        weight = tg.weight_of(tg.unwrap(model.get_submodule(path))).detach().float()
        f = kron_factors(target.out_features, target.in_features)
        terms = kpsvd(weight, f)
        r, energies[path], elbows[path] = select_rank(terms.sigma, rule, tau=tau,
                                                      fixed=fixed_rank, max_rank=max_rank)
        a, b = terms.truncate(r)
        modules[path] = {"soka_A": (a / scale).contiguous(), "soka_B": b.contiguous()}
        ranks[path] = r
        factors[path] = list(f)
    config = SokaConfig.model_validate({
        "r": max(ranks.values(), default=1), "scale": scale,
        "target_modules": target_modules,
        "rank_pattern": {rank_key(p): r for p, r in ranks.items()}, "factors": factors,
        "selection": {"rule": rule, "tau": tau, "energy_rank": energies,
                      "elbow_rank": elbows}})
    return Adapter((Component("soka", config, modules),))


def _soka() -> SoKA:
    method = get("soka")
    assert isinstance(method, SoKA)
    return method


def residual_weights(model: nn.Module, init: Component) -> dict[str, torch.Tensor]:
    """``W0 - dW_init`` ``[out, in]`` per module: the frozen base of a PiSSA-like run."""
    config = init.config
    assert isinstance(config, SokaConfig)
    residual = {}
    for path, tensors in init.modules.items():
        weight = tg.weight_of(tg.unwrap(model.get_submodule(path))).detach().float()
        residual[path] = weight - _soka().delta(config, tensors).to(weight.dtype)
    return residual


def export_delta(init: Component, trained: Component, *, compress: bool = False,
                 rtol: float = 1e-6) -> Component:
    """The servable delta against the ORIGINAL W0 of a run trained on ``W0 - init``:
    ``(W0 - dW_init) + dW_trained = W0 + [s_t * trained terms, -s_i * init terms]``.

    Scales are folded into A (the result has ``scale = 1``). With ``compress`` each
    module's delta is re-factored by KPSVD, keeping terms with ``sigma > rtol * sigma_1``
    (exact up to that tolerance, often far fewer than ``r_t + r_i`` terms)."""
    ci, ct = init.config, trained.config
    assert isinstance(ci, SokaConfig) and isinstance(ct, SokaConfig)
    if set(init.modules) != set(trained.modules):
        raise ValueError("init and trained adapters cover different modules")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    ranks: dict[str, int] = {}
    for path, tt in trained.modules.items():
        ti = init.modules[path]
        a = torch.cat([ct.scale * tt["soka_A"], -ci.scale * ti["soka_A"]])  # [r_t + r_i, m, n]
        b = torch.cat([tt["soka_B"], ti["soka_B"]])  # [r_t + r_i, p, q]
        if compress:
            m, n = a.shape[1:]
            p, q = b.shape[1:]
            f = KronFactors(m, n, p, q)
            delta = _soka().delta(SokaConfig(scale=1.0, target_modules=[]),
                                  {"soka_A": a, "soka_B": b})  # [out, in]
            terms = kpsvd(delta, f)
            keep = int((terms.sigma > rtol * terms.sigma[0].clamp_min(1e-30)).sum())
            a, b = terms.truncate(max(keep, 1))
        modules[path] = {"soka_A": a.contiguous(), "soka_B": b.contiguous()}
        ranks[path] = int(a.shape[0])
    config = ct.model_copy(update={
        "r": max(ranks.values(), default=1), "scale": 1.0,
        "rank_pattern": {rank_key(p): r for p, r in ranks.items()}})
    return Component("soka", config, modules)


def spectra(model: nn.Module, paths: Iterable[str]) -> Mapping[str, torch.Tensor]:
    """KPSVD spectra ``[K]`` per module path (for inspecting a base before choosing tau)."""
    available = tg.discover(model)
    out = {}
    for path in paths:
        target = available[path]
        weight = tg.weight_of(tg.unwrap(model.get_submodule(path))).detach().float()
        out[path] = kpsvd(weight, kron_factors(target.out_features, target.in_features)).sigma
    return out
