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
    """``sum_j flatten(A_j X B_j^T)`` for ``x: [N, n q]`` and one slot's terms
    (``a: [r, m, n]``, ``b: [r, p, q]``) or each token's (``a: [N, r, m, n]``,
    ``b: [N, r, p, q]``) -> ``[N, m p]``. Two matmuls, no copy of ``x`` or ``b``: every
    term's ``X B_j^T`` in one product against the terms stacked along ``p`` (for one slot a
    single GEMM over all its tokens), then ``A`` contracts over ``(n, term)`` at once."""
    tokens = x.shape[0]
    r, m, n = a.shape[-3:]
    p, q = b.shape[-2:]
    bt = b.reshape(*b.shape[:-3], r * p, q).transpose(-1, -2)  # [(N,) q, r p]
    t = x.reshape(tokens, n, q) @ bt  # [N, n, r p]: X B_j^T for every term j
    a2 = a.movedim(-3, -1).reshape(*a.shape[:-3], m, n * r)  # [(N,) m, n r], (n, j) order
    y = a2 @ t.reshape(tokens, n * r, p)  # [N, m, p] = sum_j A_j (X B_j^T)
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

    def delta(self, slot: int, x: torch.Tensor) -> torch.Tensor | None:
        """``sum_j (A_j ⊗ B_j) x`` of one slot's terms ``[n, out]``; None when it has none."""
        r = self.slot_rank[slot]
        if r == 0:
            return None
        return _kron_apply(x, self.t["A"][slot, :r], self.t["B"][slot, :r])  # [n, out]

    def apply_slot(self, slot: int, h: torch.Tensor, x: torch.Tensor,
                   weight: torch.Tensor) -> torch.Tensor:
        delta = self.delta(slot, x)  # [n, out]
        return h if delta is None else h + delta

    def apply_span(self, slot: int, h: torch.Tensor, x: torch.Tensor,
                   weight: torch.Tensor) -> None:
        delta = self.delta(slot, x)  # [n, out]
        if delta is not None:
            h.add_(delta)  # in place: h is a view of the forward's running value

    def apply_tokens(self, routing: Routing, active: list[int], h: torch.Tensor,
                     x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        r = self.max_rank(active)
        if r == 0:
            return h
        a = routing.take(self.t["A"][:, :r])  # [N, r, m, n]
        b = routing.take(self.t["B"][:, :r])  # [N, r, p, q]
        return h + _kron_apply(x, a, b)  # [N, out]
