"""The wrapped projection: base layer plus every bank of the slot pool for that module."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tessera.adapters import kernels
from tessera.adapters.banks.base import Bank
from tessera.adapters.banks.lowrank import LowRankBank
from tessera.adapters.banks.rowscale import RowScaleBank
from tessera.adapters.plan import Groups, Routing, StepMeta
from tessera.adapters.targets import TargetInfo, bias_of, weight_of

STAGES = ("input", "delta", "scale", "output")


class AdapterLayer(nn.Module):
    """Replaces a Linear/Conv1D in the model. Without a plan, or when no token of the batch
    uses a slot holding anything on this module (and no hot merge covers it), it is exactly
    the base layer."""

    def __init__(self, base: nn.Module, target: TargetInfo, banks: Sequence[Bank],
                 meta: StepMeta) -> None:
        super().__init__()
        self.base = base
        self.target = target
        self.meta = meta  # the pool's routing of the forward in flight (shared, not owned)
        self.by_kind = {bank.kind: bank for bank in banks}
        self.staged: list[Bank] = sorted(banks, key=lambda b: STAGES.index(b.stage))

    @property
    def weight(self) -> torch.Tensor:
        """W0 ``[out, in]`` (a view for Conv1D)."""
        return weight_of(self.base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.meta.plan
        if plan is None:
            return self.base(x)  # type: ignore[no-any-return]
        flat = x.reshape(-1, self.target.in_features)  # [N, in]
        if plan.static is not None:  # one fixed form, whatever the step's slots
            return self._static(flat, plan.static, plan.slot_ids).reshape(
                *x.shape[:-1], self.target.out_features)
        routing = plan.routing(flat.shape[0])
        banks = [b for b in self.staged if not b.occupied.isdisjoint(routing.unique_set)]
        hot = self.meta.hot.get(self.target.path) if routing.hot is not None else None
        if not banks and hot is None:
            return self.base(x)  # type: ignore[no-any-return]
        weight = self.weight  # W0 [out, in]: what the banks' math is written against
        h = flat
        for bank in banks:
            if bank.stage == "input":
                h = bank.apply(h, flat, weight, routing)
        x_in = h  # [N, in]
        bias = bias_of(self.base)
        # The bias joins the base GEMM (bit-identical base rows) unless a scale bank must
        # act between them (DoRA scales W0 x + delta, not the bias).
        late_bias = bias is not None and any(b.stage == "scale" for b in banks)
        y_bias = None if late_bias else bias
        y = self.base_linear(x_in, y_bias) if hot is None else hot.linear(x_in, y_bias)  # [N, out]
        if hot is None:
            y = self._after_base(banks, y, x_in, weight, routing, bias if late_bias else None)
        elif routing.cold is not None:
            # only the other tokens: W0 x_in back (W_hot x - up (down x)), then their banks
            cold, sub = routing.cold  # [C], their routing
            span = routing.cold_span
            if span is not None:  # one run (the engine's steps): views, nothing gathered
                xc = x_in[span[0]:span[1]]  # [C, in]
                yc = y[span[0]:span[1]].addmm_(xc @ hot.down.t(), hot.up.t(),
                                               alpha=-1.0)  # [C, out], in place in y
            else:
                xc = x_in.index_select(0, cold)  # [C, in]
                yc = torch.addmm(y.index_select(0, cold), xc @ hot.down.t(), hot.up.t(),
                                 alpha=-1.0)  # [C, out]
            done = self._after_base(banks, yc, xc, weight, sub, bias if late_bias else None)
            if late_bias and bias is not None:
                y = y + bias  # the hot tokens' bias (the others' are in ``done``)
            if span is None:
                y.index_copy_(0, cold, done)  # [N, out], in place: y is this layer's own
            elif done is not yc or late_bias:
                y[span[0]:span[1]] = done
        elif late_bias and bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], self.target.out_features)

    def _static(self, flat: torch.Tensor, groups: Groups, slot_ids: torch.Tensor
                ) -> torch.Tensor:
        """A static step (:meth:`StepMeta.begin_static`) ``[N, out]``: ``W0 x``, the
        low-rank bank over every slot's group, the row-scale bank's ``g`` of each token's
        slot (DoRA; 1 for every other slot and for base tokens: exact), then the bias —
        the same for every step, whatever its slots (``slot_ids`` ``[N]`` on the device)."""
        low, scale = self.by_kind.get("lowrank"), self.by_kind.get("rowscale")
        bias = bias_of(self.base)
        y = self.base_linear(flat, None if scale is not None else bias)  # [N, out]
        if isinstance(low, LowRankBank):
            y = low.apply_static(y, flat, groups)
        if isinstance(scale, RowScaleBank):
            y = scale.apply_static(y, slot_ids)
            if bias is not None:
                y = y + bias
        return y

    @property
    def packed(self) -> torch.Tensor | None:
        """W0 packed for oneDNN where the base is a ``PackedLinear`` (kernels), else None."""
        return kernels.packed_of(self.base)

    def base_linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``W0 x`` plus ``bias`` ``[N, out]``, on the kernel the base layer runs
        (:mod:`tessera.adapters.kernels`): base rows equal the base layer's own output."""
        return kernels.linear(x, self.weight, self.packed, bias)

    @staticmethod
    def _after_base(banks: list[Bank], y: torch.Tensor, x_in: torch.Tensor,
                    weight: torch.Tensor, routing: Routing, late_bias: torch.Tensor | None
                    ) -> torch.Tensor:
        """The delta and scale banks on ``y = W0 x_in`` ``[n, out]``, the bias where a scale
        bank kept it back, then the output banks."""
        for bank in banks:
            if bank.stage in ("delta", "scale"):
                y = bank.apply(y, x_in, weight, routing)
        if late_bias is not None:
            y = y + late_bias
        for bank in banks:
            if bank.stage == "output":
                y = bank.apply(y, x_in, weight, routing)
        return y
