"""The low-rank bank's three batched forms (segment, stacked, per-token gather) against a
per-token plain-torch loop, over random slot assignments."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.banks.lowrank import LowRankBank
from adapters.method import Limits, SlotData
from adapters.plan import Routing
from adapters.targets import TargetInfo

TARGET = TargetInfo("layers.0.q_proj", in_features=12, out_features=10, kind="linear",
                    has_bias=False)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), num_slots=st.integers(1, 5), num_tokens=st.integers(0, 12),
       seed=st.integers(0, 2**16))
def test_batched_forms_equal_a_per_token_loop(data: st.DataObject, num_slots: int,
                                              num_tokens: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    bank = LowRankBank(num_slots, TARGET, Limits(max_rank=4), torch.float32, torch.device("cpu"))
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for slot in range(num_slots):
        if data.draw(st.booleans(), label=f"load {slot}"):
            r = data.draw(st.integers(1, 4), label=f"rank {slot}")
            a = torch.randn(r, TARGET.in_features, generator=gen)  # [r, in]
            b = torch.randn(TARGET.out_features, r, generator=gen)  # [out, r]
            bank.write(slot, SlotData({"A": a, "B": b}))
            factors[slot] = (a, b)
    ids = data.draw(st.lists(st.integers(-1, num_slots - 1), min_size=num_tokens,
                             max_size=num_tokens), label="slot ids")
    routing = Routing(torch.tensor(ids, dtype=torch.long), num_slots, gather_budget=1 << 40)
    x = torch.randn(num_tokens, TARGET.in_features, generator=gen)  # [N, in]
    h = torch.randn(num_tokens, TARGET.out_features, generator=gen)  # [N, out]
    expected = h.clone()
    for i, slot in enumerate(ids):
        if slot in factors:
            a, b = factors[slot]
            expected[i] += b @ (a @ x[i])
    active = bank.active(routing)
    if not active:
        assert torch.equal(bank.apply(h.clone(), x, x, routing), h)
        return
    for name, out in (("stacked", bank.apply_stacked(routing, active, h.clone(), x)),
                      ("per-token", bank.apply_per_token(routing, active, h.clone(), x)),
                      ("dispatch", bank.apply(h.clone(), x, x, routing))):
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=name)
