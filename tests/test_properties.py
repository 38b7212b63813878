"""Property tests: a pool-wrapped standalone projection equals a per-token plain-torch loop.

A :class:`Holder` is a tiny module tree with one ``nn.Linear`` or ``Conv1D`` at a
Hugging-Face-like path (``model.layers.0.self_attn.q_proj``...), so every method factory's
``target_modules`` finds it. For random shapes, biases, slot tables, slot assignments and
adapters, the pool's batched forward (segment mode and gather mode) must equal a loop that
runs each token alone through its own adapter's reference layer (or the bare projection for
``-1`` and empty slots).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from tessera.adapters import Adapter, Component, PoolConfig, SlotPool, reference_model, registry
from tessera.adapters import targets as tg
from tessera.adapters.methods.lora import LoraConfig
from tests.factories import FACTORIES
from tests.helpers import assert_close_scaled

FP32_REL = 1e-5
MODES = {"segment": 0, "gather": 1 << 40}

# Paths named like the projections of real decoders, so factories' target_modules match.
LINEAR_PATHS = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.o_proj",
                "model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj",
                "model.layers.0.mlp.gate_proj")
CONV_PATHS = ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
              "transformer.h.0.mlp.c_proj", "transformer.h.0.mlp.c_fc")
PROBE_SHAPE = (12, 8)
# Factories draw ranks up to 7 (sized for the tiny models' 32-wide projections); HRA with
# Gram-Schmidt rightly refuses r > in_features, so factory adapters get modules >= 8 wide.
# The LoRA property below, with adapters built here, goes down to 1-wide modules.
FACTORY_MIN_DIM = 8  # (in, out) used to find which path a factory targets


class Holder(nn.Module):
    """A module tree holding one projection at ``path``; forward applies it."""

    def __init__(self, path: str, proj: nn.Module) -> None:
        super().__init__()
        self.proj_path = path
        parent: nn.Module = self
        *parents, leaf = path.split(".")
        for name in parents:
            child = nn.Module()
            parent.add_module(name, child)
            parent = child
        parent.add_module(leaf, proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.get_submodule(self.proj_path)(x)  # type: ignore[no-any-return]


def make_projection(kind: str, in_f: int, out_f: int, bias: bool,
                    gen: torch.Generator) -> nn.Module:
    """A Linear (``[out, in]``) or Conv1D (``[in, out]``, always biased) with random
    weights of order one (Conv1D's 0.02 init would hide the base term)."""
    proj: nn.Module
    if kind == "linear":
        proj = nn.Linear(in_f, out_f, bias=bias)
        weight = torch.randn(out_f, in_f, generator=gen) * 0.5
    else:
        proj = Conv1D(out_f, in_f)  # type: ignore[no-untyped-call]
        weight = torch.randn(in_f, out_f, generator=gen) * 0.5
    with torch.no_grad():
        proj.weight.copy_(weight)
        if proj.bias is not None:
            proj.bias.copy_(torch.randn(out_f, generator=gen) * 0.3)
    return proj.eval()


def make_holder(kind: str, path: str, in_f: int, out_f: int, bias: bool,
                seed: int) -> Holder:
    gen = torch.Generator().manual_seed(seed)
    return Holder(path, make_projection(kind, in_f, out_f, bias, gen)).eval()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """``assert_close_scaled`` at fp32 tolerance, also for empty (N=0) outputs."""
    assert actual.shape == expected.shape, f"{what}: {actual.shape} != {expected.shape}"
    if expected.numel():
        assert_close_scaled(actual, expected, FP32_REL, what)


def targets_only(adapter: Adapter, path: str) -> bool:
    """The adapter has weights on ``path`` and on nothing else."""
    paths = {p for c in adapter.components for p in c.modules}
    return paths == {path}


def build(method: str, holder: nn.Module, gen: torch.Generator) -> Adapter:
    """The method's factory adapter on the holder, minus components that target none of
    its modules (a factory spreading components over q_proj and o_proj, say)."""
    adapter = FACTORIES[method](holder, gen)
    return Adapter(tuple(c for c in adapter.components if c.modules))


def find_path(method: str, kind: str) -> str | None:
    """The first Holder path the method's factory builds a one-module adapter for."""
    for path in LINEAR_PATHS if kind == "linear" else CONV_PATHS:
        holder = make_holder(kind, path, *PROBE_SHAPE, True, 0)
        try:
            adapter = build(method, holder, torch.Generator().manual_seed(0))
        except Exception:  # a factory that needs a full model (e.g. its config): next path
            continue
        if targets_only(adapter, path):
            return path
    return None


BUILDABLE: list[tuple[str, str, str]] = [
    (method, kind, path)
    for method in registry.all_names() for kind in ("linear", "conv1d")
    if (path := find_path(method, kind)) is not None
]


def needed_limits(adapters: list[Adapter], holder: nn.Module) -> dict[str, int]:
    """The largest rank / bottleneck width the adapters use (computed from their configs)."""
    available = tg.discover(holder)
    needed = {"max_rank": 1, "max_bottleneck_dim": 1}
    for adapter in adapters:
        for comp in adapter.components:
            method = registry.get(comp.method)
            for path in comp.modules:
                rank = method.rank(comp.config, available[path])
                needed[method.rank_limit] = max(needed[method.rank_limit], rank)
    return needed


def per_token_loop(holder: Holder, refs: dict[int, nn.Module], x: torch.Tensor,
                   slots: torch.Tensor) -> torch.Tensor:
    """Expected output ``[N, out]``: each token alone through its slot's reference layer,
    or the bare base projection when its slot is -1 or holds nothing."""
    base = tg.unwrap(holder.get_submodule(holder.proj_path))
    rows = []
    for i, slot in enumerate(slots.tolist()):
        layer = refs.get(slot, base)
        rows.append(layer(x[i:i + 1]))
    out_f = tg.weight_of(base).shape[0]
    return torch.cat(rows) if rows else x.new_zeros(0, out_f)


def lora_adapter(path: str, in_f: int, out_f: int, r: int, alpha: float, rslora: bool,
                 gen: torch.Generator) -> Adapter:
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=[path.rsplit(".", 1)[-1]],
                        use_rslora=rslora)
    tensors = {"lora_A": torch.randn(r, in_f, generator=gen) * 0.3,
               "lora_B": torch.randn(out_f, r, generator=gen) * 0.3}
    return Adapter((Component("lora", config, {path: tensors}),))


# --- strategies -------------------------------------------------------------------------

@st.composite
def scenarios(draw: st.DrawFn, min_dim: int = 1) -> dict[str, Any]:
    """Shapes, a slot table with some slots loaded, and per-token slot ids."""
    num_slots = draw(st.integers(1, 4))
    loaded = draw(st.lists(st.integers(0, num_slots - 1), unique=True, max_size=num_slots))
    slot_ids = draw(st.lists(st.integers(-1, num_slots - 1), max_size=10))
    layout = draw(st.sampled_from(["flat", "tokens_2d", "rows"]))
    return {"in_f": draw(st.integers(min_dim, 20)),
            "out_f": draw(st.integers(min_dim, 20)),
            "bias": draw(st.booleans()), "num_slots": num_slots, "loaded": loaded,
            "slot_ids": slot_ids, "layout": layout, "extra_rank": draw(st.integers(0, 3)),
            "seed": draw(st.integers(0, 2**16))}


def shaped_inputs(sc: dict[str, Any], gen: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, routed_ids, per_token_ids)``: ``x`` shaped ``[N, in]``, ``[B, T, in]`` with
    per-token ids ``[B, T]``, or ``[B, T, in]`` with per-row ids ``[B]``."""
    ids = torch.tensor(sc["slot_ids"], dtype=torch.long)
    n, in_f = ids.shape[0], sc["in_f"]
    if sc["layout"] == "flat":
        return torch.randn(n, in_f, generator=gen), ids, ids
    if sc["layout"] == "tokens_2d":  # [1, N] per-token ids
        return torch.randn(1, n, in_f, generator=gen), ids.reshape(1, n), ids
    t = 3  # per-row ids: each row's slot covers its 3 tokens
    x = torch.randn(n, t, in_f, generator=gen)
    return x, ids, ids.repeat_interleave(t)


def check_pool_against_loop(holder: Holder, adapters: dict[int, Adapter],
                            sc: dict[str, Any]) -> None:
    gen = torch.Generator().manual_seed(sc["seed"] + 1)
    x, routed, per_token = shaped_inputs(sc, gen)
    refs = {slot: reference_model(holder, a).get_submodule(holder.proj_path)
            for slot, a in adapters.items()}
    flat = x.reshape(-1, sc["in_f"])
    with torch.no_grad():
        want = per_token_loop(holder, refs, flat, per_token)
    needed = needed_limits(list(adapters.values()), holder)
    for mode, budget in MODES.items():
        wrapped = copy.deepcopy(holder)
        pool = SlotPool(wrapped, PoolConfig(
            num_slots=sc["num_slots"], max_rank=needed["max_rank"] + sc["extra_rank"],
            max_bottleneck_dim=needed["max_bottleneck_dim"] + sc["extra_rank"],
            gather_budget=budget))
        for slot, adapter in adapters.items():
            pool.load(slot, adapter)
        with torch.no_grad(), pool.use(routed):
            got = wrapped(x)
        assert got.shape == (*x.shape[:-1], want.shape[-1])
        assert_close(got.reshape(-1, want.shape[-1]), want, f"{mode} slots={sc['slot_ids']}")


# --- properties ---------------------------------------------------------------------------

def test_every_slot_method_builds_on_both_projection_kinds() -> None:
    """The generic property covers every slot method on Linear and Conv1D (no method drops
    out silently). Generators are not required: HyperLoader generates LoRA on q *and* v
    plus bottlenecks on the output projections of every layer, which one projection cannot
    hold; what it generates is LoRA + bottleneck, both covered here."""
    built = {(m, k) for m, k, _ in BUILDABLE}
    assert ("lora", "linear") in built
    assert {(m, k) for m in registry.names() for k in ("linear", "conv1d")} <= built


@pytest.mark.parametrize(("method", "kind", "path"), BUILDABLE)
@settings(max_examples=30, deadline=None)
@given(sc=scenarios(min_dim=FACTORY_MIN_DIM))
def test_pool_equals_per_token_reference_loop(method: str, kind: str, path: str,
                                              sc: dict[str, Any]) -> None:
    bias = sc["bias"] or kind == "conv1d"
    holder = make_holder(kind, path, sc["in_f"], sc["out_f"], bias, sc["seed"])
    gen = torch.Generator().manual_seed(sc["seed"])
    adapters = {slot: build(method, holder, gen) for slot in sc["loaded"]}
    for adapter in adapters.values():
        assert targets_only(adapter, path)
    check_pool_against_loop(holder, adapters, sc)


@settings(max_examples=40, deadline=None)
@given(sc=scenarios(), kind=st.sampled_from(["linear", "conv1d"]),
       ranks=st.lists(st.integers(1, 6), min_size=4, max_size=4),
       alpha=st.floats(0.5, 16.0), rslora=st.booleans())
def test_lora_pool_equals_plain_formula(sc: dict[str, Any], kind: str, ranks: list[int],
                                        alpha: float, rslora: bool) -> None:
    """LoRA with random ranks up to the pool max, checked against ``W0 x + b + s B A x``
    written out here (not the method's reference)."""
    path = LINEAR_PATHS[0] if kind == "linear" else CONV_PATHS[0]
    in_f, out_f = sc["in_f"], sc["out_f"]
    holder = make_holder(kind, path, in_f, out_f, sc["bias"] or kind == "conv1d", sc["seed"])
    gen = torch.Generator().manual_seed(sc["seed"])
    adapters = {slot: lora_adapter(path, in_f, out_f, ranks[slot], alpha, rslora, gen)
                for slot in sc["loaded"]}
    max_rank = max(ranks) + sc["extra_rank"]
    x, routed, per_token = shaped_inputs(sc, torch.Generator().manual_seed(sc["seed"] + 1))
    flat = x.reshape(-1, in_f)
    base = tg.unwrap(holder.get_submodule(path))
    w = tg.weight_of(base).detach()  # [out, in]
    b = tg.bias_of(base)
    want = flat @ w.t() + (0 if b is None else b.detach())  # [N, out]
    for i, slot in enumerate(per_token.tolist()):
        if slot in adapters:
            t = adapters[slot].components[0].modules[path]
            r = t["lora_A"].shape[0]
            s = alpha / math.sqrt(r) if rslora else alpha / r
            want[i] += s * (t["lora_B"] @ (t["lora_A"] @ flat[i]))
    for mode, budget in MODES.items():
        wrapped = copy.deepcopy(holder)
        pool = SlotPool(wrapped, PoolConfig(num_slots=sc["num_slots"], max_rank=max_rank,
                                            gather_budget=budget))
        for slot, adapter in adapters.items():
            pool.load(slot, adapter)
        with torch.no_grad(), pool.use(routed):
            got = wrapped(x).reshape(-1, out_f)
        assert_close(got, want, f"{mode} {kind} slots={sc['slot_ids']}")


EDGE_IDS = {"empty": [], "single": [0], "all_base": [-1, -1, -1], "all_one": [1, 1, 1, 1],
            "repeated": [0, 1, 0, 1, -1, 1], "all_slots": [2, 1, 0, -1]}


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("case", sorted(EDGE_IDS))
def test_edge_slot_assignments_for_every_buildable_method(kind: str, case: str) -> None:
    """Fixed edge cases (N=0, one token, all -1, all one slot, repeats) for each method."""
    methods = [(m, p) for m, k, p in BUILDABLE if k == kind]
    assert methods
    for method, path in methods:
        sc = {"in_f": 9, "out_f": 10, "bias": True, "num_slots": 3, "loaded": [0, 1],
              "slot_ids": EDGE_IDS[case], "layout": "flat", "extra_rank": 1, "seed": 5}
        holder = make_holder(kind, path, 9, 10, True, 5)
        gen = torch.Generator().manual_seed(7)
        adapters = {slot: build(method, holder, gen) for slot in (0, 1)}
        check_pool_against_loop(holder, adapters, sc)


def test_adapter_changes_the_output() -> None:
    """Guard against a vacuous yardstick: a loaded slot differs from the base projection."""
    for method, kind, path in BUILDABLE:
        holder = make_holder(kind, path, 9, 10, True, 3)
        adapter = build(method, holder, torch.Generator().manual_seed(3))
        ref = reference_model(holder, adapter).get_submodule(path)
        x = torch.randn(5, 9, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            diff = (ref(x) - F.linear(x, tg.weight_of(tg.unwrap(holder.get_submodule(path))),
                                      tg.bias_of(tg.unwrap(holder.get_submodule(path)))))
        assert diff.abs().max() > 1e-3, f"{method} on {kind}: adapter is the identity"
