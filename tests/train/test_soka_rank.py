"""SoKA's KPSVD start, beyond tests/test_kpsvd.py: on a real base weight the reconstruction
error falls with every added term and equals the optimum of the truncated SVD of the
rearranged matrix (numpy, own index arithmetic); both rank rules pick the planted rank of
weights built with a known Kronecker spectrum, through the training start."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tessera.adapters import targets as tg
from tessera.adapters.banks.kron import kron_factors
from tessera.adapters.kpsvd import kpsvd
from tessera.adapters.methods.soka import SokaConfig
from tessera.train.base import Base
from tessera.train.init import soka_start
from tests.models import tiny_model

PATH = "model.layers.0.self_attn.q_proj"  # [64, 64] in the built-in, [32, 32] in tiny_model


def np_rearrange(w: np.ndarray, m: int, n: int, p: int, q: int) -> np.ndarray:
    """R[i n + j, k q + ll] = W[i p + k, j q + ll] by index arithmetic."""
    rows, cols = np.indices((m * n, p * q))
    i, j = rows // n, rows % n
    k, ll = cols // q, cols % q
    return w[i * p + k, j * q + ll]


def test_error_falls_with_rank_to_the_svd_optimum(random_base: Base) -> None:
    weight = tg.weight_of(random_base.model.get_submodule(PATH)).detach().double()
    f = kron_factors(*weight.shape)
    r_mat = np_rearrange(weight.numpy(), *f)
    u, s, vt = np.linalg.svd(r_mat, full_matrices=False)
    terms = kpsvd(weight, f)
    errors = []
    for r in range(1, len(s) + 1):
        a, b = terms.truncate(r)
        approx = sum(torch.kron(a[j], b[j]) for j in range(r))
        err = float((weight - approx).square().sum())
        optimum = float(np.square(r_mat - (u[:, :r] * s[:r]) @ vt[:r]).sum())  # Eckart-Young
        assert err == pytest.approx(optimum, rel=1e-6, abs=1e-9), r
        errors.append(err)
    assert all(later < earlier for earlier, later in itertools.pairwise(errors))
    assert errors[-1] == pytest.approx(0.0, abs=1e-9)


def planted(sigma: list[float], seed: int) -> list[torch.Tensor]:
    """The terms ``sigma_k A_k ⊗ B_k`` ``[32, 32]`` with orthonormal vec(A_k), vec(B_k):
    their sum's KPSVD spectrum is exactly ``sigma`` (its rearrangement is U diag(sigma) V^T)."""
    f = kron_factors(32, 32)
    gen = torch.Generator().manual_seed(seed)
    ua, _ = torch.linalg.qr(torch.randn(f.m * f.n, len(sigma), generator=gen,
                                        dtype=torch.float64))
    ub, _ = torch.linalg.qr(torch.randn(f.p * f.q, len(sigma), generator=gen,
                                        dtype=torch.float64))
    return [value * torch.kron(ua[:, k].reshape(f.m, f.n), ub[:, k].reshape(f.p, f.q))
            for k, value in enumerate(sigma)]


# energies 100 81 64 1 .81 .64 .49 .36 (sum 248.3): shares .403 .729 .987 ...
SPECTRUM = [10.0, 9.0, 8.0, 1.0, 0.9, 0.8, 0.7, 0.6]


@pytest.mark.parametrize(("rule", "tau", "want"), [
    ("energy", 0.7, 2), ("energy", 0.95, 3), ("energy", 0.99, 4), ("elbow", 0.5, 3),
])
def test_rank_rules_find_the_planted_rank(rule: str, tau: float, want: int) -> None:
    model = tiny_model("llama")
    terms = planted(SPECTRUM, seed=1)
    weight = sum(terms, torch.zeros(32, 32, dtype=torch.float64))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.copy_(weight.float())
    start = soka_start(model, ["q_proj"], rule=rule, tau=tau,  # type: ignore[arg-type]
                       fixed_rank=1, max_rank=16)
    config = start.init.config
    assert isinstance(config, SokaConfig) and config.selection is not None
    assert config.selection.rule == rule
    for path, tensors in start.init.modules.items():
        assert tensors["soka_A"].shape[0] == config.rank_of(path) == want
        assert config.selection.elbow_rank[path] == 3
        shares = np.cumsum(np.square(SPECTRUM)) / np.square(SPECTRUM).sum()
        assert config.selection.energy_rank[path] == int((shares < tau - 1e-12).sum()) + 1
        # the residual base is W0 minus exactly the kept terms
        kept = sum(terms[:want], torch.zeros(32, 32, dtype=torch.float64))
        torch.testing.assert_close(start.residual[path].double(), weight - kept,
                                   rtol=0, atol=1e-5)
