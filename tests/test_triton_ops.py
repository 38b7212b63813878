"""The kernel backends of ``tessera.adapters.ops``: Triton's SGMV-like LoRA (in Triton's
interpreter on the CPU, fp32; on CUDA where ``scripts/device-check`` runs the suite) and
the torch backend, against a plain per-token loop over the bank tensors."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.adapters import PoolConfig, SlotPool, ops
from tessera.adapters.ops import torch_ops, triton_ops
from tessera.adapters.plan import Routing
from tests.factories import FACTORIES
from tests.helpers import assert_close_scaled
from tests.models import tiny_model

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def reference(h: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              slots: list[int], rank: int) -> torch.Tensor:
    """``h_i + B_s (A_s x_i)`` token by token, in float64."""
    out = h.double().clone()
    for i, s in enumerate(slots):
        if s >= 0:
            out[i] += b[s, :, :rank].double() @ (a[s, :rank].double() @ x[i].double())
    return out


def case(slots: list[int], num_slots: int, r_max: int, d_in: int, d_out: int, seed: int
         ) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(num_slots + 1, r_max, d_in, generator=gen)  # [S + 1, r_max, in]
    b = torch.randn(num_slots + 1, d_out, r_max, generator=gen)  # [S + 1, out, r_max]
    a[num_slots], b[num_slots] = 0.0, 0.0  # the null row, as in a bank
    x = torch.randn(len(slots), d_in, generator=gen)  # [N, in]
    h = torch.randn(len(slots), d_out, generator=gen)  # [N, out]
    return tuple(t.to(DEVICE) for t in (a, b, x, h))


@settings(max_examples=25, deadline=None)
@given(slots=st.lists(st.integers(-1, 4), min_size=1, max_size=40),
       rank=st.integers(1, 8), d_in=st.integers(1, 80), d_out=st.integers(1, 150),
       seed=st.integers(0, 1000))
def test_triton_and_torch_lora_equal_the_per_token_loop(slots: list[int], rank: int,
                                                        d_in: int, d_out: int,
                                                        seed: int) -> None:
    """Any layout (runs, scattered tokens, base tokens, a group past one block of 16
    tokens), ranks not a power of two, widths past one block and not multiples of it."""
    a, b, x, h = case(slots, 5, 8, d_in, d_out, seed)
    routing = Routing(torch.tensor(slots), 5, 1 << 40, device=DEVICE)
    want = reference(h.cpu(), x.cpu(), a.cpu(), b.cpu(), slots, rank)
    if not routing.unique:
        return  # no token routed: nothing for the ops (the bank never calls them)
    groups = routing.groups(routing.unique)
    for name, op in (("triton", triton_ops.lora), ("torch", torch_ops.lora)):
        got = op(h, x, a, b, groups, rank)
        assert_close_scaled(got.cpu(), want, 1e-5, name)


def test_a_group_over_several_blocks_and_a_rank_of_sixteen() -> None:
    slots = [2] * 37 + [0, -1, 1] * 5  # 37 tokens of one slot: three blocks of 16
    a, b, x, h = case(slots, 3, 16, 96, 200, 7)
    routing = Routing(torch.tensor(slots), 3, 1 << 40, device=DEVICE)
    got = triton_ops.lora(h, x, a, b, routing.groups(routing.unique), 16)
    assert_close_scaled(got.cpu(), reference(h.cpu(), x.cpu(), a.cpu(), b.cpu(), slots, 16),
                        1e-5, "triton")


def test_the_backend_setting() -> None:
    assert ops.resolve("torch", DEVICE) == "torch"
    assert ops.resolve("auto", torch.device("cpu")) == "torch"  # the CPU keeps its forms
    assert ops.lora("torch") is torch_ops.lora and ops.lora("triton") is triton_ops.lora


def test_triton_is_refused_where_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="Triton kernels do not run on cpu"):
        ops.resolve("triton", torch.device("cpu"))
    ops.triton_agrees.cache_clear()
    try:
        assert not ops.triton_agrees("cpu", torch.float32)  # the probe: cannot run here
    finally:
        ops.triton_agrees.cache_clear()


def test_the_start_up_probe_runs_the_kernels() -> None:
    """``auto``'s probe on this machine's device (interpreted on a CPU): the kernels run
    and equal the torch backend."""
    ops.triton_agrees.cache_clear()
    assert ops.triton_agrees(DEVICE.type, torch.float32)
    if DEVICE.type == "cuda":
        assert ops.resolve("auto", DEVICE) == "triton"
        assert ops.triton_agrees("cuda", torch.bfloat16)


def test_a_backward_through_the_pool_takes_the_torch_forms() -> None:
    """The Triton kernels have no backward: where autograd needs one (an input that
    requires grad), the low-rank bank runs its torch forms and the gradient is right."""
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(2)
    loras = [FACTORIES["lora"](model, gen) for _ in range(2)]
    x = torch.randn(3, model.config.hidden_size, generator=gen)  # [N, hidden]
    grads = {}
    for kernels in ("torch", "triton"):
        pool = SlotPool(copy.deepcopy(model), PoolConfig(num_slots=2, max_rank=8,
                                                         kernels=kernels))
        for slot, adapter in enumerate(loras):
            pool.load(slot, adapter)
        layer = pool.layers["model.layers.0.self_attn.q_proj"]
        leaf = x.clone().requires_grad_()
        with pool.use(torch.tensor([0, 1, 0])):
            layer(leaf).square().sum().backward()
        assert leaf.grad is not None
        grads[kernels] = leaf.grad
    torch.testing.assert_close(grads["triton"], grads["torch"])
