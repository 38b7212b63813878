"""A forward never reads a device value on the host (issue 8: the adapter metadata of a
step is on the device and nothing inside the forward waits for the device).

Tensors on PyTorch's ``meta`` device have shapes and no values: any host read of one
(``.item()``, ``.tolist()``, ``int()``, ``nonzero``, ``unique``) raises. So a forward of
a model and slot pool copied to ``meta`` completes only if every host-side decision
(distinct slots, token counts, runs, segment layouts, hot tokens) comes from the host copy
of the slot ids, and every index tensor reaches the device as an upload. On a GPU such a
read is a synchronisation that stalls the forward (and breaks CUDA-graph capture). The
values are checked elsewhere (the method matrix, the mixed-batch and hot-merge tests);
the packed layout here also runs through the CPU pool's layers, each token equal to the
token routed alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tessera.adapters import SlotPool, registry
from tessera.adapters.plan import Routing
from tests.factories import FACTORIES
from tests.helpers import assert_close_scaled, meta_twin

NAMES = [*registry.all_names(), "hut"]  # a second HUT slot: one HUT slot runs dense
HUT = NAMES.index("hut")  # the one with a prefill chunk (its dense form)
LORA = NAMES.index("lora")


def packed_layout() -> list[int]:
    """One engine-like packed step (per-token slots): a prefill chunk of 10 tokens of the
    HUT slot (enough for its dense form), decode tokens of every slot and of the base
    scattered and repeated, and a prefill chunk of 9 LoRA tokens."""
    decode = [*range(len(NAMES)), -1, *reversed(range(len(NAMES))), -1, LORA, HUT]
    return [HUT] * 10 + decode + [LORA] * 9


@torch.no_grad()
def forward(model: nn.Module, pool: SlotPool, ids: torch.Tensor, slots: torch.Tensor,
            hot: list[bool] | None = None) -> tuple[torch.Tensor, Routing]:
    """Logits of ``ids`` under ``slots``, and the routing the layers read."""
    with pool.use(slots, hot=hot) as plan:
        out = model(input_ids=ids).logits
        return out, plan.routing(int(ids.numel()))


@torch.no_grad()
def assert_layers_route_each_token(pool: SlotPool, layout: list[int]) -> None:
    """Every wrapped layer of the CPU pool on random inputs under ``layout`` equals the
    layer with each token routed alone."""
    gen = torch.Generator().manual_seed(8)
    for path, layer in pool.layers.items():
        x = torch.randn(len(layout), layer.target.in_features, generator=gen)  # [N, in]
        with pool.use(torch.tensor(layout)):
            got = layer(x)  # [N, out]
        for i, slot in enumerate(layout):
            with pool.use(torch.tensor([slot])):
                assert_close_scaled(got[i], layer(x[i:i + 1])[0], 1e-5, f"{path} token {i}")


@pytest.mark.parametrize("gather_budget", [0, 1 << 40])
def test_a_padded_batch_of_every_method_reads_nothing_back(gather_budget: int) -> None:
    (model, _), (meta_model, meta) = meta_twin(NAMES, gather_budget)
    slots = torch.tensor([*range(len(NAMES)), -1])  # a row per slot, then a base row
    out, routing = forward(meta_model, meta, torch.zeros(len(NAMES) + 1, 5, dtype=torch.long,
                                                          device="meta"), slots)
    assert out.shape == (len(NAMES) + 1, 5, model.config.vocab_size)
    assert routing.unique == list(range(len(NAMES)))


@pytest.mark.parametrize("gather_budget", [0, 1 << 40])
def test_a_packed_step_of_every_method_reads_nothing_back(gather_budget: int) -> None:
    (model, cpu), (meta_model, meta) = meta_twin(NAMES, gather_budget)
    layout = packed_layout()
    ids = torch.zeros(1, len(layout), dtype=torch.long, device="meta")
    out, routing = forward(meta_model, meta, ids, torch.tensor([layout]))
    assert out.shape == (1, len(layout), model.config.vocab_size)
    # the layout reached the routing's host-built parts (its caches, filled by the banks):
    # segment mode gathers each slot's scattered rows; gather mode runs HUT's prefill slot
    # dense on its rows and gathers the other slots (a subset, segment layouts, one-hots)
    if gather_budget:
        assert HUT in routing._rows
        assert routing._subsets and routing._segments and routing._membership
    else:
        assert sorted(routing._rows) == list(range(len(NAMES)))
    assert_layers_route_each_token(cpu, layout)


@pytest.mark.parametrize("all_hot", [False, True])
def test_a_hot_merge_beside_other_tokens_reads_nothing_back(all_hot: bool) -> None:
    (model, cpu), (meta_model, meta) = meta_twin(NAMES, 1 << 40)
    prepared = cpu.prepare(FACTORIES["lora"](model, torch.Generator().manual_seed(3)))
    meta.install_hot(meta.hot_merge(prepared))
    layout = packed_layout()
    hot = [True] * len(layout) if all_hot else [i % 3 == 0 for i in range(len(layout))]
    slots = torch.tensor([[-1 if h else s for s, h in zip(layout, hot, strict=True)]])
    ids = torch.zeros(1, len(layout), dtype=torch.long, device="meta")
    out, routing = forward(meta_model, meta, ids, slots, hot=hot)
    assert out.shape == (1, len(layout), model.config.vocab_size)
    assert (routing.cold is None) == all_hot


def test_slot_ids_on_a_device_are_refused_by_the_step_metadata() -> None:
    (_, _), (_, meta) = meta_twin(NAMES, 0)
    with pytest.raises(Exception, match="host"):
        meta.meta.begin(torch.zeros(3, dtype=torch.long, device="meta"))
