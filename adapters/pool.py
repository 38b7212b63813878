"""Slot pool: wraps a model's projections once and holds adapters in preallocated slots.

Usage::

    pool = SlotPool(model, PoolConfig(num_slots=8, max_rank=16))
    pool.load(0, adapter_a)            # validated, lowered, copied into slot 0
    pool.load(1, adapter_b)
    with pool.use(torch.tensor([0, 1, -1])):    # per-row slots, -1 = base only
        logits = model(input_ids).logits

``prepare`` (validate + lower) and ``write`` (copy into a slot) are separate so a server can
prepare off the forward loop and only copy under its lock. Both refuse a lowered tensor that
is not finite in the banks' dtype (:func:`tessera.adapters.validation.check_lowered`):
lowering folds config scalars into the weights, so finite uploads can still overflow.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tessera.adapters import kernels, ops, registry
from tessera.adapters import targets as tg
from tessera.adapters.banks import BANKS, Bank
from tessera.adapters.errors import AdapterValidationError, PoolError
from tessera.adapters.layer import AdapterLayer
from tessera.adapters.method import Adapter, Limits, Method, MethodConfig, SlotData, Tensors
from tessera.adapters.ops import Choice
from tessera.adapters.plan import Groups, HotDelta, SlotPlan, StepMeta
from tessera.adapters.validation import check_lowered, validate_component

STATIC_KINDS = frozenset({"lowrank", "rowscale"})  # banks with a static form (use_static)


class PoolConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    num_slots: int = Field(8, ge=1, le=65536)
    max_rank: int = Field(16, ge=1, description="rank / terms limit of every slot")
    max_bottleneck_dim: int = Field(64, ge=1)
    methods: list[str] | None = Field(None, description="methods to allocate banks for; all")
    target_modules: list[str] | str | None = Field(
        None, description="modules to wrap (PEFT rule); None = every adaptable projection")
    gather_budget: int = Field(1 << 22, ge=0,
                               description="max gathered elements per bank in gather mode")
    dense_slots: int = Field(
        8, ge=0, description="slots per module that may keep a dense [out, in] weight "
                             "(HUT: W0 ⊙ a^T c, one GEMM instead of r); memory: up to this "
                             "many copies of the HUT-targeted weights; 0 = never "
                             "(banks.hadamard)")
    kernels: Choice = Field(
        "auto", description="backend of the banks' batched ops (tessera.adapters.ops): "
                            "'auto' = Triton on CUDA where installed and its start-up "
                            "probe passes, else torch")


Part = tuple[Method[Any], MethodConfig, Tensors]


def parts_by_module(adapter: Adapter) -> dict[str, list[Part]]:
    """The adapter's components regrouped per module path, weight stage first."""
    grouped: dict[str, list[Part]] = {}
    for component in adapter.components:
        method = registry.get(component.method)
        for path, tensors in component.modules.items():
            grouped.setdefault(path, []).append((method, component.config, tensors))
    for path, parts in grouped.items():
        parts.sort(key=lambda p: p[0].stage != "weight")
        for stage in ("weight", "output"):
            names = [p[0].name for p in parts if p[0].stage == stage]
            if len(names) > 1:
                raise AdapterValidationError(
                    f"several {stage}-stage components on one module: {names}", tensor=path)
    return grouped


@dataclass
class PreparedAdapter:
    """Validated, lowered slot data, ready to be copied into any slot."""

    adapter: Adapter
    data: dict[tuple[str, str], SlotData]  # (module path, bank kind) -> data


class SlotPool:
    def __init__(self, model: nn.Module, config: PoolConfig) -> None:
        self.config = config
        self.limits = Limits(config.max_rank, config.max_bottleneck_dim)
        first = next(model.parameters())
        self.dtype, self.device = first.dtype, first.device
        methods = config.methods if config.methods is not None else registry.names()
        self.methods = frozenset(registry.get(name).name for name in methods)
        kinds = sorted({kind for name in self.methods for kind in registry.get(name).banks})
        available = tg.discover(model)
        if config.target_modules is not None:
            available = {p: available[p] for p in tg.resolve(config.target_modules, available)}
        if not available:
            raise PoolError("the pool's target_modules select no projection of the model")
        self.targets: dict[str, tg.TargetInfo] = available
        self.meta = StepMeta(config.num_slots, config.gather_budget, self.device)
        self.backend = ops.resolve(config.kernels, self.device, self.dtype)
        self.layers: dict[str, AdapterLayer] = {}
        for path, target in available.items():
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            base = getattr(parent, child)
            banks = [BANKS[kind](config.num_slots, target, self.limits, self.dtype, self.device,
                                 dense_slots=config.dense_slots, base_layer=base,
                                 backend=self.backend)
                     for kind in kinds]
            layer = AdapterLayer(base, target, banks, self.meta)
            setattr(parent, child, layer)
            self.layers[path] = layer
        self.resident: list[Adapter | None] = [None] * config.num_slots
        self.kinds: list[frozenset[str]] = [frozenset()] * config.num_slots  # banks a slot fills

    @property
    def num_slots(self) -> int:
        return self.config.num_slots

    @property
    def nbytes(self) -> int:
        """Device bytes of the banks' slot tensors (allocated with the pool)."""
        return sum(t.numel() * t.element_size() for layer in self.layers.values()
                   for bank in layer.by_kind.values() for t in bank.t.values())

    @property
    def derived_nbytes(self) -> int:
        """Device bytes the banks keep derived from their slots (stacked factors, HUT's
        dense weights): they grow with use, bounded per bank, and go with slot writes."""
        return sum(bank.derived_nbytes() for layer in self.layers.values()
                   for bank in layer.by_kind.values())

    # --- loading --------------------------------------------------------------------------
    def prepare(self, adapter: Adapter) -> PreparedAdapter:
        """Validate against the base and the pool limits, then lower into slot data."""
        for component in adapter.components:
            if component.method not in self.methods:
                raise PoolError(f"method {component.method!r} is not enabled in this pool")
            validate_component(component, self.targets, self.limits)
        return self.lower(adapter)

    def lower(self, adapter: Adapter) -> PreparedAdapter:
        """Lower an adapter already validated against this pool (``validate_component``)
        into slot data; every lowered tensor must be finite in the banks' dtype."""
        data: dict[tuple[str, str], SlotData] = {}
        for path, parts in parts_by_module(adapter).items():
            layer = self.layers[path]
            weight = layer.weight.detach().float()  # lower in fp32; banks cast on write
            for method, config, tensors in parts:
                on_device = {k: v.detach().to(self.device, torch.float32)
                             for k, v in tensors.items()}
                for kind, slot_data in method.lower(config, on_device, layer.target,
                                                    weight).items():
                    if (path, kind) in data:
                        raise AdapterValidationError(
                            f"two components write the {kind!r} bank", tensor=path)
                    data[(path, kind)] = slot_data
        check_lowered(data, self.dtype)
        return PreparedAdapter(adapter, data)

    def write(self, slot: int, prepared: PreparedAdapter) -> None:
        """Copy prepared data into ``slot`` (evicting what it held); no other slot changes.
        Data that cannot be written (prepared for another pool, or not finite in the banks'
        dtype) is refused before the slot is touched; a write that fails part-way leaves the
        slot empty, never half-loaded."""
        for path, kind in prepared.data:
            layer = self.layers.get(path)
            if layer is None or kind not in layer.by_kind:
                raise PoolError(f"{path}: this pool has no {kind!r} bank on that module "
                                "(data prepared for another pool?)")
        check_lowered(prepared.data, self.dtype)
        self.evict(slot)
        try:
            for (path, kind), slot_data in prepared.data.items():
                self.layers[path].by_kind[kind].write(slot, slot_data)
        except BaseException:
            self.evict(slot)
            raise
        self.resident[slot] = prepared.adapter
        self.kinds[slot] = frozenset(kind for _, kind in prepared.data)

    def load(self, slot: int, adapter: Adapter) -> None:
        self.write(slot, self.prepare(adapter))

    def evict(self, slot: int) -> None:
        self._check_slot(slot)
        for layer in self.layers.values():
            for bank in layer.by_kind.values():
                if slot in bank.occupied:
                    bank.clear(slot)
        self.resident[slot] = None
        self.kinds[slot] = frozenset()

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise PoolError(f"slot {slot} out of range [0, {self.num_slots})")

    # --- forward --------------------------------------------------------------------------
    # --- hot merge (dLoRA) ------------------------------------------------------------------
    @staticmethod
    def mergeable_hot(prepared: PreparedAdapter) -> bool:
        """Whether an adapter can be the hot merge: it lowers to the low-rank bank only
        (LoRA, rsLoRA, HRA), so ``dW = B A`` and the other tokens' correction is one
        rank-r product."""
        return bool(prepared.data) and all(kind == "lowrank" for _, kind in prepared.data)

    def hot_merge(self, prepared: PreparedAdapter) -> dict[str, HotDelta]:
        """Per module: ``W0 + B A`` (computed in fp32, stored in the base's dtype) and the
        factors. New buffers: W0 is only read. Build it off the forward thread."""
        if not self.mergeable_hot(prepared):
            raise PoolError("only adapters lowering to the low-rank bank have a hot merge")
        merged: dict[str, HotDelta] = {}
        for (path, _), data in prepared.data.items():
            layer = self.layers[path]
            w0 = layer.weight  # [out, in]
            down = data.tensors["A"].to(self.device, torch.float32)  # [r, in]
            up = data.tensors["B"].to(self.device, torch.float32)  # [out, r]
            weight = (w0.float() + up @ down).to(w0.dtype).contiguous()  # [out, in]
            # the merged step runs on the kernel the base runs on
            packed = None if layer.packed is None else kernels.pack(weight)
            merged[path] = HotDelta(weight, down.to(self.dtype), up.to(self.dtype), packed)
        return merged

    def install_hot(self, merged: dict[str, HotDelta] | None) -> None:
        """Make ``merged`` the hot merge of the next forwards (None: none); between
        forwards only (one reference swapped, nothing copied)."""
        if self.meta.plan is not None:
            raise PoolError("the hot merge changes between forwards only")
        self.meta.hot = dict(merged or {})

    def static_ok(self, slots: list[int]) -> bool:
        """Whether a step whose tokens use ``slots`` (host; -1 = base) can run as a static
        step (:meth:`use_static`): the banks run the Triton kernels, no hot merge is
        installed, and every slot used holds low-rank data only, row scales aside (LoRA,
        rsLoRA, HRA, DoRA)."""
        return (self.backend == "triton" and not self.meta.hot
                and all(s < 0 or (self.kinds[s] <= STATIC_KINDS and "lowrank" in self.kinds[s])
                        for s in set(slots)))

    @contextmanager
    def use_static(self, host: torch.Tensor, slot_ids: torch.Tensor,
                   groups: Groups) -> Iterator[SlotPlan]:
        """Route the forwards inside the block as a static step (a CUDA graph's capture
        and replays): ``host`` ``[n]`` slot ids on the host, ``slot_ids`` and ``groups``
        device buffers the caller owns (:meth:`StepMeta.begin_static`); the caller checks
        :meth:`static_ok` first."""
        plan = self.meta.begin_static(host, slot_ids, groups)
        try:
            yield plan
        finally:
            self.meta.end()

    @contextmanager
    def use(self, slot_ids: torch.Tensor | list[int],
            hot: list[bool] | None = None) -> Iterator[SlotPlan]:
        """Route the forwards inside the block: per-row ``[B]`` or per-token ``[B, T]``
        slot ids (-1 = base only), checked and written once into the pool's
        :class:`~tessera.adapters.plan.StepMeta`. ``hot`` (flat, per row or token): the
        rows of the installed hot merge; give them slot -1 (they need no slot)."""
        ids = torch.as_tensor(slot_ids, dtype=torch.long).cpu()  # routed from the host
        if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= self.num_slots):
            raise PoolError(f"slot ids must lie in [-1, {self.num_slots})")
        plan = self.meta.begin(ids, hot)
        try:
            yield plan
        finally:
            self.meta.end()

    def banks(self) -> Mapping[str, Mapping[str, Bank]]:
        return {path: layer.by_kind for path, layer in self.layers.items()}
