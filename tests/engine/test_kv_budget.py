"""The bounded KV cache: admission within the budget, preemption of the newest row when the
running rows outgrow it (recomputed later: the same tokens as the independent reference),
usage reporting, and the context limit it implies."""

from __future__ import annotations

import pytest
import torch

from tessera.adapters import Adapter
from tessera.engine.errors import ContextLengthError
from tessera.engine.kvcache import BatchCache, KVBudget
from tessera.engine.requests import GenerationRequest
from tessera.engine.sampling import SamplingParams
from tessera.engine.scheduler import StepReport
from tests.engine.conftest import PROMPTS, EngineFactory, Reference, spec

LONG = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def test_budget_counts_the_step_area_in_blocks() -> None:
    budget = KVBudget(tokens=128, block=16)
    assert budget.area(0, 100) == 0
    assert budget.area(3, 15) == 3 * 16  # 15 tokens + the new one: one block each
    assert budget.area(3, 16) == 3 * 32  # the new token opens a second block
    assert budget.fits(4, 31) and not budget.fits(5, 31)
    with pytest.raises(ValueError):
        KVBudget(tokens=8, block=16)


def test_slabs_never_grow_past_their_limit() -> None:
    cache = BatchCache(limit=96)
    row = [(torch.zeros(1, 2, 10, 4), torch.zeros(1, 2, 10, 4))]  # [1, H, L, D]
    for _ in range(3):
        cache.add(row, 10)
    rows, length = cache.capacity
    assert rows >= 3 and length >= 11 and rows * length <= 96
    assert cache.lengths == [10, 10, 10]


def test_slabs_grow_only_the_dimension_that_is_short() -> None:
    """Memory follows use: rows joining one by one double the rows, not the length too."""
    cache = BatchCache()
    row = [(torch.zeros(1, 2, 170, 4), torch.zeros(1, 2, 170, 4))]  # [1, H, L, D]
    for _ in range(32):
        cache.add(row, 170)
    assert cache.capacity == (32, 171)
    cache.add([(torch.zeros(1, 2, 300, 4), torch.zeros(1, 2, 300, 4))], 300)
    assert cache.capacity == (64, 342)  # both were short: each doubles


async def test_preempted_rows_give_the_reference_tokens(
        make_engine: EngineFactory, adapters: dict[str, Adapter], reference: Reference) -> None:
    """Six rows of 40 new tokens each in a budget that holds about two: rows are preempted
    as they grow and recomputed later, and every row's tokens equal the reference's."""
    engine = await make_engine(kv_cache_tokens=160, kv_block_size=16, max_batch_rows=8)
    usage: list[tuple[int, int]] = []
    engine.subscribe(lambda report: usage.append(
        (engine.stats().kv_tokens_used, engine.stats().kv_tokens_total)))
    names = ("lora", "hra", "soka", "bottleneck", "hut")
    handles = [engine.submit(GenerationRequest(
        prompt=PROMPTS[i], sampling=LONG,
        adapter=spec(names[i], adapters[names[i]]) if i < len(names) else None))
        for i in range(6)]
    results = [await h.result() for h in handles]
    for i, result in enumerate(results):
        adapter = adapters[names[i]] if i < len(names) else None
        assert result.token_ids == reference.greedy(adapter, PROMPTS[i], 40), i
        assert result.finish_reason == "length"
    stats = engine.stats()
    assert stats.preemptions > 0
    assert usage and all(used <= total == 160 for used, total in usage)
    assert stats.kv_tokens_used == 0  # nothing runs: nothing held
    assert all(engine.slots.pins(name) == 0 for name in names)  # preemption kept one pin


async def test_preemption_keeps_seeded_sampling(
        make_engine: EngineFactory, adapters: dict[str, Adapter]) -> None:
    """A seeded sampled row preempted mid-way gives the tokens it gives running alone."""
    sampled = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=40, seed=7,
                             ignore_eos=True)

    def request() -> GenerationRequest:
        return GenerationRequest(prompt=PROMPTS[0], sampling=sampled,
                                 adapter=spec("dora", adapters["dora"]))

    alone = await (await make_engine()).submit(request()).result()
    tight = await make_engine(kv_cache_tokens=96, kv_block_size=16)
    reports: list[StepReport] = []
    tight.subscribe(reports.append)
    crowd = [tight.submit(GenerationRequest(prompt=PROMPTS[2], sampling=LONG))
             for _ in range(2)]
    target = tight.submit(request())
    result = await target.result()
    for handle in crowd:
        await handle.result()
    assert tight.stats().preemptions > 0
    assert result.token_ids == alone.token_ids


async def test_the_budget_caps_the_context_limit(make_engine: EngineFactory) -> None:
    engine = await make_engine(kv_cache_tokens=72, kv_block_size=16)
    assert engine.base.context_limit == 64  # whole blocks within the budget
    with pytest.raises(ContextLengthError):
        engine.submit(GenerationRequest(prompt="x" * 40,
                                        sampling=SamplingParams(max_tokens=30)))


async def test_row_usage_counts_each_row_in_blocks(make_engine: EngineFactory) -> None:
    """``kv_tokens_rows``: each running row's own length rounded up to blocks, summed (what
    paged blocks would hold); the slab's area (``kv_tokens_used``) pads the short row to
    the long one and is never less."""
    engine = await make_engine(kv_block_size=16)
    long, short = [5 + i % 50 for i in range(100)], [7, 8, 9]
    new = 20
    seen: list[tuple[int, int]] = []  # (rows, used) after each decode-only step of both

    def observe(report: StepReport) -> None:
        if report.decode_rows == 2 and report.prefill_tokens == 0:
            stats = engine.stats()
            seen.append((stats.kv_tokens_rows, stats.kv_tokens_used))

    engine.subscribe(observe)
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    handles = [engine.submit(GenerationRequest(prompt=p, sampling=params))
               for p in (long, short)]
    for handle in handles:
        assert len((await handle.result()).token_ids) == new

    def blocks(n: int) -> int:
        return -(-n // 16) * 16

    assert seen[-1] == (0, 0)  # the last step finished both rows: nothing held after it
    seen = seen[:-1]
    assert len(seen) >= new // 2  # both rows decoded side by side for much of the run

    def expected(j: int, d: int) -> list[int]:
        """After the j-th decode step of the long row the cache holds ``len(long) + j`` of
        it; the short row (prefilled in fewer chunks) is ``d`` steps ahead."""
        return [blocks(len(long) + j + k) + blocks(len(short) + j + d + k)
                for k in range(len(seen))]

    fits = [(j, d) for j in range(new + 1) for d in range(new + 1)
            if expected(j, d) == [rows for rows, _ in seen]]
    assert fits, str(seen)  # one row = one length each, rounded up to blocks, every step
    j = fits[0][0]
    for k, (rows, used) in enumerate(seen):  # the slab pads the short row to the long one
        assert used >= 2 * blocks(len(long) + j + k) > rows, k
    assert engine.stats().kv_tokens_rows == 0  # nothing runs: nothing held
