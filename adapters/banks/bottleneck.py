"""Bottleneck adapter layer on a module's output (Houlsby/Pfeiffer; HyperLoader's adapters).

``h <- h + LN(U act(D h + d) + u)`` with ``D: [k, out]``, ``d: [k]``, ``U: [out, k]``,
``u: [out]`` and an optional LayerNorm ``(g, b): [out]``. ``h`` is the wrapped layer's
output after its bias, so the adapter sees exactly what the next residual add would.

Slots are padded to the pool's ``max_bottleneck_dim``: padding hidden units have zero rows
in ``D``/``d`` and zero columns in ``U``, and every allowed activation maps 0 to 0, so they
are exact no-ops. The activation, whether LN is applied and its eps are host-side per-slot
metadata (``slot_meta``); gather mode needs all active slots to agree on them, otherwise the
base class falls back to segment mode. Gather mode is *stacked*, as the low-rank bank's:
the active slots' ``D`` and ``U^T`` stacked once per set of active slots (kept until a slot
is written, :mod:`.cache`), two GEMMs for the batch, each token's block kept. An empty
slot (and the null row) yields ``z = 0`` and ``LN(0) * 1 + 0 = 0``, so base-only tokens
are untouched in gather mode too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F

from tessera.adapters.banks.cache import StackedBank
from tessera.adapters.method import Limits
from tessera.adapters.plan import Routing
from tessera.adapters.targets import TargetInfo

Activation = Literal["relu", "gelu", "silu", "tanh"]
ACTIVATIONS: tuple[str, ...] = get_args(Activation)

# Only activations with act(0) == 0: padding hidden units must contribute exactly nothing.
_ACT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact (erf) GELU, not the tanh approximation
    "silu": F.silu,
    "tanh": torch.tanh,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return _ACT[name]


def slot_meta(act: str, layer_norm: bool, eps: float) -> dict[str, Any]:
    """The host-side flags one slot carries (compared for gather-mode compatibility)."""
    return {"activation": act, "layer_norm": layer_norm, "eps": float(eps)}


class BottleneckBank(StackedBank):
    kind = "bottleneck"
    stage = "output"
    fills = {"down": 0.0, "down_bias": 0.0, "up": 0.0, "up_bias": 0.0,
             "ln_weight": 1.0, "ln_bias": 0.0}
    rank_tensor = ("down", 0)
    factors_names = ("down", "up")

    @classmethod
    def shapes(cls, target: TargetInfo, limits: Limits) -> dict[str, tuple[int, ...]]:
        k, out = limits.max_bottleneck_dim, target.out_features
        return {"down": (k, out),       # [k_max, out]
                "down_bias": (k,),      # [k_max]
                "up": (out, k),         # [out, k_max]
                "up_bias": (out,),      # [out]
                "ln_weight": (out,),    # [out]
                "ln_bias": (out,)}      # [out]

    def apply_slot(self, slot: int, h: torch.Tensor, x: torch.Tensor,
                   weight: torch.Tensor) -> torch.Tensor:
        meta = self.slot_meta[slot]
        k = self.slot_rank[slot]
        t = self.t
        hidden = torch.addmm(t["down_bias"][slot, :k], h, t["down"][slot, :k].t())  # [n, k]
        hidden = activation(meta["activation"])(hidden)
        z = torch.addmm(t["up_bias"][slot], hidden, t["up"][slot, :, :k].t())  # [n, out]
        if meta["layer_norm"]:
            z = F.layer_norm(z, (z.shape[-1],), t["ln_weight"][slot], t["ln_bias"][slot],
                             meta["eps"])
        return h + z  # [n, out]

    def apply_tokens(self, routing: Routing, active: list[int], h: torch.Tensor,
                     x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Stacked: every token against every active slot's ``D`` in one GEMM
        ``[N, U k]``, the activation, each token's own block kept, one GEMM with the
        stacked ``U^T``; biases and LayerNorm affines picked per token
        (:meth:`Routing.take`, ``[N, out]``). Base-only tokens keep no block: ``z = 0``,
        ``LN(0) = 0``."""
        meta = self.slot_meta[active[0]]  # can_gather: every active slot agrees
        stack = self.stack(active)  # D [U, k, out], U^T [U, k, out]
        u, k = stack.a.shape[0], stack.a.shape[1]
        slots, onehot = routing.membership(active)  # [U], [N, U]
        t = self.t
        down_bias = t["down_bias"][:, :k].index_select(0, slots)  # [U, k]
        hidden = torch.addmm(down_bias.view(-1), h, stack.a.view(u * k, -1).t())  # [N, U k]
        hidden = activation(meta["activation"])(hidden).view(-1, u, k)
        # masked_fill, not a multiply: another slot's overflow (inf * 0) must not leak
        hidden = hidden.masked_fill(~onehot.unsqueeze(-1), 0.0)  # [N, U, k]
        z = torch.addmm(routing.take(t["up_bias"]), hidden.view(-1, u * k),
                        stack.bt.view(u * k, -1))  # [N, out]
        if meta["layer_norm"]:
            z = F.layer_norm(z, (z.shape[-1],), eps=meta["eps"])  # [N, out]
            z = torch.addcmul(routing.take(t["ln_bias"]), z,
                              routing.take(t["ln_weight"]))  # per-token affine
        return h + z  # [N, out]

    def gather_elements(self, routing: Routing, active: list[int]) -> int:
        """Stacked factors plus three per-token ``[N, out]`` picks."""
        out = self.target.out_features
        return 2 * len(active) * self.max_rank(active) * out + 3 * routing.num_tokens * out

    def can_gather(self, active: list[int]) -> bool:
        first = self.slot_meta[active[0]]
        return all(self.slot_meta[s] == first for s in active[1:])
