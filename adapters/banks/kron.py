"""Sum-of-Kronecker-products term (SoKA): ``y += sum_j (A_j ⊗ B_j) x``.

``A: [r_max, m, n]``, ``B: [r_max, p, q]`` with ``out = m p`` and ``in = n q``. With ``x``
reshaped row-major to ``X: [n, q]``, ``(A ⊗ B) x = flatten(A X B^T)`` (``[m, p]``), so dW is
never built. The method's scale is folded into ``A`` when lowering.

The factor shapes of a module are a fixed function of ``(out, in)`` — :func:`kron_factors`,
the one rule the bank, the SoKA method's schema and the KPSVD utilities all use — because
the pool allocates this bank on every wrapped module before any adapter is seen.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from tessera.adapters.banks.base import Bank
from tessera.adapters.method import Limits
from tessera.adapters.plan import Routing
from tessera.adapters.targets import TargetInfo


class KronFactors(NamedTuple):
    """``W [m p, n q] = A [m, n] ⊗ B [p, q]``."""

    m: int
    n: int
    p: int
    q: int


def most_square_split(size: int) -> tuple[int, int]:
    """``(a, b)`` with ``a * b == size``, ``a <= b`` and ``a`` the largest such divisor
    (``32 -> (4, 8)``, ``48 -> (6, 8)``, ``4096 -> (64, 64)``; a prime gives ``(1, size)``)."""
    if size < 1:
        raise ValueError(f"cannot factor a dimension of size {size}")
    a = 1
    d = 1
    while d * d <= size:
        if size % d == 0:
            a = d
        d += 1
    return a, size // a


def kron_factors(out_features: int, in_features: int) -> KronFactors:
    """tessera's factorization rule: the most square split of each dimension,
    ``out = m * p`` and ``in = n * q`` with ``m <= p``, ``n <= q`` (so ``A`` is the small
    factor and ``B`` the large one)."""
    m, p = most_square_split(out_features)
    n, q = most_square_split(in_features)
    return KronFactors(m, n, p, q)


def kron_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Plain-torch yardstick building dW: ``x: [N, in]``, ``a: [r, m, n]``,
    ``b: [r, p, q]`` -> ``(sum_j a_j ⊗ b_j) x`` ``[N, out]``."""
    delta = torch.zeros(a.shape[1] * b.shape[1], a.shape[2] * b.shape[2],
                        dtype=x.dtype, device=x.device)  # [out, in]
    for j in range(a.shape[0]):
        delta = delta + torch.kron(a[j], b[j])  # [m p, n q]
    return x @ delta.t()  # [N, out]


def _kron_apply(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_j flatten(A_j X B_j^T)`` for ``x: [N, n q]``, ``a: [N or 1, r, m, n]``,
    ``b: [N or 1, r, p, q]`` -> ``[N, m p]``. Two batched matmuls; the sum over terms is
    folded into the second one's contraction."""
    tokens = x.shape[0]
    r, m, n = a.shape[1:]
    p, q = b.shape[2:]
    xm = x.reshape(tokens, 1, n, q)  # [N, 1, n, q]  (row-major reshape of x)
    t = xm @ b.transpose(-1, -2)  # [N, r, n, p] = X B_j^T per term
    t = t.reshape(tokens, r * n, p)  # [N, r n, p]
    a2 = a.permute(0, 2, 1, 3).reshape(a.shape[0], m, r * n)  # [N or 1, m, r n]
    y = a2 @ t  # [N, m, p] = sum_j A_j (X B_j^T)
    return y.reshape(tokens, m * p)  # [N, out]


class KronBank(Bank):
    kind = "kron"
    stage = "delta"
    fills = {"A": 0.0, "B": 0.0}
    rank_tensor = ("A", 0)

    @classmethod
    def shapes(cls, target: TargetInfo, limits: Limits) -> dict[str, tuple[int, ...]]:
        f = kron_factors(target.out_features, target.in_features)
        return {"A": (limits.max_rank, f.m, f.n),  # [r_max, m, n]
                "B": (limits.max_rank, f.p, f.q)}  # [r_max, p, q]

    def apply_slot(self, slot: int, h: torch.Tensor, x: torch.Tensor,
                   weight: torch.Tensor) -> torch.Tensor:
        r = self.slot_rank[slot]
        if r == 0:
            return h
        a = self.t["A"][slot, :r].unsqueeze(0)  # [1, r, m, n]
        b = self.t["B"][slot, :r].unsqueeze(0)  # [1, r, p, q]
        return h + _kron_apply(x, a, b)  # [n, out]

    def apply_tokens(self, routing: Routing, active: list[int], h: torch.Tensor,
                     x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        r = self.max_rank(active)
        if r == 0:
            return h
        a = self.t["A"][routing.index, :r]  # [N, r, m, n]
        b = self.t["B"][routing.index, :r]  # [N, r, p, q]
        return h + _kron_apply(x, a, b)  # [N, out]
