"""Hadamard-product term against the *shared* base weight (HUT):

    y += sum_j a_j ⊙ (W0 (c_j ⊙ x)),   a: [r_max, out],  c: [r_max, in]

which equals ``D x`` with ``D = W0 ⊙ sum_j a_j c_j^T`` ``[out, in]``. Two forms:

- *stacked*: each token's ``r`` scaled copies of ``x`` are stacked and multiplied by W0 in
  one GEMM: no per-adapter weight, W0 read once per layer however many adapters the batch
  holds, at ``r`` times the base's FLOPs on the slot's tokens. The GEMM runs on the kernel
  the base layer runs (oneDNN's packed W0 on a CPU, :mod:`tessera.adapters.kernels`; the
  pool hands each bank its layer): decode step with 8 HUT adapters 1.83-1.96x -> 1.68-1.70x
  the base step on MKL's ``x @ W0^T`` before (hidden 1024, 4 layers, batch 32).
- *dense*: ``D`` built once per slot (``r out in`` multiply-adds, like ``r`` tokens of the
  stacked form), kept until the slot is written (:mod:`.cache`), packed for oneDNN where
  it runs (:mod:`tessera.adapters.kernels`); then one GEMM per slot on its tokens: the
  base's FLOPs, not ``r`` times them. It costs one ``[out, in]`` weight per slot held:
  ``PoolConfig.dense_slots`` caps the slots per module that keep one (default 8). Slots
  past the cap run the stacked form rather than evict another's ``D`` (active slots over
  the cap would rebuild each other every step); so does a slot whose ``D`` finds no device
  memory.

A slot takes its dense form when it has at least ``DENSE_MIN_TOKENS`` tokens in the
forward and a rank above 1 (prefill; a tenant with a large share of a decode batch), else
the stacked form (gather mode: on the stacked slots' tokens alone); the stacked form also
where no ``D`` is allowed and where autograd needs a backward through ``x`` or W0. Gather
mode's stacked form expands each token to its own slot's rank (``T = sum_i r_i`` rows; no
padding to the largest active rank). Fit: ``python -m bench.decode_step --hut-forms
--reps 12`` (HUT ranks 2-5 on q, v, down; hidden 1024, 4 layers, batch 32, fp32 oneDNN,
2-core AMD EPYC, 2026-12-01; decode step vs the base step, timed alternately), slots of
32 / 8 / 4 / 2 / 1 tokens each, with the stacked GEMM on oneDNN's packed W0: stacked 2.07 /
2.08 / 2.04 / 2.08 / 2.05x, dense 1.30 / 1.77 / 2.22 / 3.41 / 5.10x (the stacked GEMM on
MKL's ``x @ W0^T`` before: stacked 2.50 / 2.51 / 2.39 / 2.44 / 2.37x, dense 1.33 / 1.68 /
2.14 / 3.57 / 5.20x, when the 4-layer step favoured ``D`` slightly at 4 tokens while the
engine on the 8-layer model of ``bench.engine_throughput``, 8 HUT adapters over 32 rows,
measured the opposite: 127 tok/s with the threshold at 8, 102 at 4). Hence 8. On a GPU,
where decode is memory-bound throughout, the balance differs: not measured (no GPU lent).
Empty rows (``a = c = 0``) add exactly zero; ``slot_rank`` skips them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from tessera.adapters import kernels
from tessera.adapters.banks.base import Bank
from tessera.adapters.banks.cache import DerivedCache
from tessera.adapters.method import Limits
from tessera.adapters.plan import Routing, upload
from tessera.adapters.targets import TargetInfo

log = logging.getLogger(__name__)


def hadamard_reference(x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor,
                       c: torch.Tensor) -> torch.Tensor:
    """Plain-torch yardstick building the dense weight: ``(W0 ⊙ a^T c) x``.
    ``x: [N, in]``, ``weight: [out, in]``, ``a: [r, out]``, ``c: [r, in]`` -> ``[N, out]``."""
    dense = weight * (a.t() @ c)  # [out, in]
    return x @ dense.t()  # [N, out]


def _stacked(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None,
             a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``sum_j a_j ⊙ W0 (c_j ⊙ x)`` for ``x: [N, in]``, ``a: [N or 1, r, out]``,
    ``c: [N or 1, r, in]`` -> ``[N, out]``."""
    n, r = x.shape[0], a.shape[1]
    scaled = x.unsqueeze(1) * c  # [N, r, in]: r scaled copies per token
    # one GEMM against W0, on the kernel the base layer runs
    z = kernels.linear(scaled.reshape(n * r, -1), weight, packed, None)  # [N * r, out]
    return (z.reshape(n, r, -1) * a).sum(dim=1)  # [N, out]


@dataclass(frozen=True)
class Dense:
    """One slot's ``D = W0 ⊙ a^T c``: ``[out, in]``, or oneDNN's packed layout of it."""

    weight: torch.Tensor  # [out, in] (opaque when packed)
    packed: bool
    numel: int  # out * in

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``D x``: ``x`` ``[n, in]`` -> ``[n, out]``."""
        if self.packed:
            return kernels.packed_linear(x, self.weight, None)
        return x @ self.weight.t()


# A slot's dense form turns ``n r`` rows of GEMM against W0 into ``n`` rows against ``D``,
# at the price of reading ``D``: worth it from this many tokens (fit in the module docstring).
DENSE_MIN_TOKENS = 8


def takes_dense(num_tokens: int, rank: int) -> bool:
    """Whether a slot of ``rank`` on ``num_tokens`` tokens of a forward runs its dense form
    (rank 1: one product with W0 either way, and no ``D`` to read)."""
    return rank > 1 and num_tokens >= DENSE_MIN_TOKENS


class HadamardBank(Bank):
    kind = "hadamard"
    stage = "delta"
    fills = {"a": 0.0, "c": 0.0}
    rank_tensor = ("c", 0)

    def setup_derived(self) -> None:
        size = self.target.out_features * self.target.in_features
        self.dense: DerivedCache[Dense] = DerivedCache(
            budget=self.dense_slots * size, entries=self.dense_slots, evict=False)
        self.pack = kernels.supported(self.dtype, self.device.type)

    @classmethod
    def shapes(cls, target: TargetInfo, limits: Limits) -> dict[str, tuple[int, ...]]:
        return {"a": (limits.max_rank, target.out_features),  # [r_max, out]
                "c": (limits.max_rank, target.in_features)}  # [r_max, in]

    @property
    def w0_packed(self) -> torch.Tensor | None:
        """W0 in oneDNN's packed layout where the base layer runs on it, else None."""
        return kernels.packed_of(self.base_layer)

    def slot_changed(self, slot: int) -> None:
        self.dense.invalidate(slot)

    def derived_nbytes(self) -> int:
        return self.dense.numel * self.t["a"].element_size()

    # --- dense form ---------------------------------------------------------------------
    def dense_for(self, slot: int, num_tokens: int, x: torch.Tensor, weight: torch.Tensor
                  ) -> Dense | None:
        """The slot's ``D`` for its ``num_tokens`` tokens of the forward (built on first
        use), or None where the stacked form runs: too few tokens (:func:`takes_dense`),
        the cap reached, or autograd needing a backward (``D`` is built without one)."""
        if not takes_dense(num_tokens, self.slot_rank[slot]):
            return None
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return None
        if not self.dense.admits((slot,)):
            return None
        try:
            return self.dense.get((slot,), lambda: self.build_dense(slot, weight))
        except torch.OutOfMemoryError:  # the device is full: the stacked form needs no D
            log.warning("no memory for a dense HUT weight; stacked form",
                        extra={"target": self.target.path, "slot": slot})
            return None

    def build_dense(self, slot: int, weight: torch.Tensor) -> Dense:
        r = self.slot_rank[slot]
        with torch.no_grad():
            d = self.t["a"][slot, :r].t() @ self.t["c"][slot, :r]  # [out, in]
            d.mul_(weight)  # in place: one fresh [out, in] buffer, not two
            return Dense(kernels.pack(d) if self.pack else d, self.pack, d.numel())

    # --- forward --------------------------------------------------------------------------
    def apply_slot(self, slot: int, h: torch.Tensor, x: torch.Tensor,
                   weight: torch.Tensor) -> torch.Tensor:
        r = self.slot_rank[slot]
        if r == 0:
            return h
        dense = self.dense_for(slot, x.shape[0], x, weight)
        if dense is not None:
            return h + dense.matmul(x)  # [n, out]
        a = self.t["a"][slot, :r].unsqueeze(0)  # [1, r, out]
        c = self.t["c"][slot, :r].unsqueeze(0)  # [1, r, in]
        return h + _stacked(x, weight, self.w0_packed, a, c)  # [n, out]

    def apply_slot_tokens(self, routing: Routing, slot: int, h: torch.Tensor, x: torch.Tensor,
                          weight: torch.Tensor) -> None:
        """Dense or stacked decided once for all the slot's tokens (a run of them is fewer:
        by :func:`takes_dense` being monotone in the tokens, stacked stays stacked)."""
        dense = self.dense_for(slot, routing.counts[slot], x, weight)
        if dense is None:
            super().apply_slot_tokens(routing, slot, h, x, weight)
            return
        spans = routing.views(slot)
        if spans is not None:
            for start, stop in spans:
                h[start:stop].add_(dense.matmul(x[start:stop]))  # [n, out], in place
            return
        rows = routing.rows(slot)  # [n_s]
        h.index_add_(0, rows, dense.matmul(x.index_select(0, rows)))

    def solo(self, routing: Routing, active: list[int]) -> list[int]:
        """Slots with tokens enough for their ``D`` take it on those tokens; the others
        share the stacked gather."""
        return [s for s in active if takes_dense(routing.counts[s], self.slot_rank[s])
                and self.dense.admits((s,))]

    def apply_tokens(self, routing: Routing, active: list[int], h: torch.Tensor,
                     x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Gather mode: the stacked form over each token's own terms (``T = sum_i r_i``
        rows, not ``N r_max``: no padding to the largest active rank), one GEMM with W0.
        ``T`` comes from the host-side counts and ranks: no host sync."""
        ranks = [self.slot_rank[s] for s in active]
        total = sum(routing.counts[s] * r for s, r in zip(active, ranks, strict=True))  # T
        if total == 0:
            return h
        device = x.device
        r_max = self.t["a"].shape[1]
        rank_of = torch.zeros(self.num_slots + 1, dtype=torch.long)  # [S+1], host
        rank_of[torch.tensor(active)] = torch.tensor(ranks)
        per_token = routing.take(upload(rank_of, device))  # [N]: 0 for other slots' tokens
        token = torch.repeat_interleave(torch.arange(x.shape[0], device=device), per_token,
                                        output_size=total)  # [T] token of each term row
        first = torch.cumsum(per_token, 0) - per_token  # [N] first row of each token
        term = torch.arange(total, device=device) - first.index_select(0, token)  # [T]
        row = routing.index.index_select(0, token) * r_max + term  # [T] into [(S+1) r_max]
        c = self.t["c"].view(-1, self.t["c"].shape[-1]).index_select(0, row)  # [T, in]
        a = self.t["a"].view(-1, self.t["a"].shape[-1]).index_select(0, row)  # [T, out]
        z = kernels.linear(x.index_select(0, token) * c, weight, self.w0_packed,
                           None)  # [T, out]: one GEMM against W0
        return h.index_add(0, token, z * a)  # [N, out]
