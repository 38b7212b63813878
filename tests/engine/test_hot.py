"""Hot tenants (engine.hot): merged rows against the unmerged path and the independent
reference (tests/server/conftest), the base left bit-identical, and the policy."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tessera.adapters import Adapter, NotMergeableError
from tessera.engine.core import Engine
from tessera.engine.requests import GenerationRequest
from tessera.engine.sampling import SamplingParams
from tessera.engine.scheduler import StepReport
from tests.engine.conftest import GREEDY, PROMPTS, EngineFactory, Reference, spec

MERGEABLE = ("lora", "dora", "hra", "hut", "soka")
POLICY = {"hot_max_merged": 1, "hot_window_s": 10.0, "hot_enter_share": 0.6,
          "hot_leave_share": 0.3, "hot_min_tokens": 16, "hot_interval_s": 3600.0}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def run(engine: Engine, jobs: list[tuple[str, Adapter | None, str]],
              sampling: SamplingParams = GREEDY) -> list[list[int]]:
    handles = [engine.submit(GenerationRequest(
        prompt=prompt, adapter=spec(key, a) if a is not None else None, sampling=sampling))
        for key, a, prompt in jobs]  # all submitted before the loop runs: one batch
    return [r.token_ids for r in await asyncio.gather(*(h.result() for h in handles))]


async def test_merged_rows_match_unmerged_and_reference(
        make_engine: EngineFactory, adapters: dict[str, Adapter], reference: Reference) -> None:
    engine = await make_engine(num_slots=8, hot_max_merged=0)  # policy off: pins only
    for name in MERGEABLE:
        await engine.pin(spec(name, adapters[name]))
    assert set(engine.stats().hot.merged) == set(MERGEABLE)  # type: ignore[union-attr]
    reports: list[StepReport] = []
    engine.subscribe(reports.append)
    # each hot adapter twice on one prompt: merged (its key) and through the slot pool
    # (another key, same weights); non-mergeable adapters and the base in the same batch
    jobs: list[tuple[str, Adapter | None, str]] = []
    for i, name in enumerate(MERGEABLE):
        jobs += [(name, adapters[name], PROMPTS[i]), (f"{name}-cold", adapters[name], PROMPTS[i])]
    jobs += [("bottleneck", adapters["bottleneck"], PROMPTS[5]),
             ("hyperloader", adapters["hyperloader"], PROMPTS[6]), ("base", None, PROMPTS[7])]
    results = await run(engine, jobs)
    for (key, adapter, prompt), tokens in zip(jobs, results, strict=True):
        assert tokens == reference.greedy(adapter, prompt, 8), key
    for i in range(len(MERGEABLE)):
        assert results[2 * i] == results[2 * i + 1]  # merged == unmerged
    # merged rows ran merged, in the same steps as the pool's rows
    decode = max(reports, key=lambda r: r.decode_rows)
    assert decode.decode_rows == len(jobs) and decode.merged_rows == len(MERGEABLE)
    for key, merged in zip(decode.adapters, decode.merged, strict=True):
        assert merged == (key in MERGEABLE), key
    assert all(engine.slots.slot_of(name) is None for name in MERGEABLE)  # no slot used
    assert engine.stats().slots.loads == len(MERGEABLE) + 2
    hot = engine.stats().hot
    assert hot is not None and hot.merged_tokens_total == 8 * len(MERGEABLE)
    assert hot.merged_share == pytest.approx(len(MERGEABLE) / len(jobs))
    assert not engine.scheduler.stepper.merged  # finished rows' groups released


async def test_base_parameters_bit_identical(
        make_engine: EngineFactory, adapters: dict[str, Adapter], reference: Reference) -> None:
    engine = await make_engine(hot_max_merged=0)
    model = engine.base.model
    before = {n: (t.detach().clone(), t.data_ptr())
              for n, t in [*model.named_parameters(), *model.named_buffers()]}
    base_ids = {id(p) for p in model.parameters()}
    for name in MERGEABLE:
        await engine.pin(spec(name, adapters[name]))
        variant = engine.hot.variant(name)
        assert variant is not None
        touched = {path for c in adapters[name].components for path in c.modules}
        for pname, param in variant.named_parameters():
            # beside the base: only the merged projections hold new tensors
            assert (id(param) in base_ids) != (pname.rpartition(".")[0] in touched), pname
    results = await run(engine, [(n, adapters[n], PROMPTS[i]) for i, n in enumerate(MERGEABLE)])
    for name, tokens in zip(MERGEABLE, results, strict=True):
        assert tokens == reference.greedy(adapters[name], PROMPTS[MERGEABLE.index(name)], 8)
    for name in MERGEABLE:
        assert engine.unpin(name)
    engine.hot.evaluate()
    assert not engine.stats().hot.merged  # type: ignore[union-attr]
    after = dict([*model.named_parameters(), *model.named_buffers()])
    assert after.keys() == before.keys()
    for n, (saved, ptr) in before.items():
        assert after[n].data_ptr() == ptr and torch.equal(after[n], saved), n


async def test_policy_merges_hot_adapter_and_drops_it_when_cold(
        make_engine: EngineFactory, adapters: dict[str, Adapter], reference: Reference) -> None:
    engine = await make_engine(**POLICY)
    clock = Clock()
    engine.hot.clock = clock
    lora, dora = adapters["lora"], adapters["dora"]
    await run(engine, [("lora", lora, PROMPTS[i]) for i in range(3)]
              + [("dora", dora, PROMPTS[3])])  # lora carries 24 of 32 tokens
    assert engine.hot.shares()["lora"] == pytest.approx(0.75)
    engine.hot.evaluate()
    await engine.hot.settle()
    assert engine.is_merged("lora") and not engine.is_merged("dora")  # max 1, dora 0.25
    reports: list[StepReport] = []
    engine.subscribe(reports.append)
    [tokens] = await run(engine, [("lora", lora, PROMPTS[4])])
    assert tokens == reference.greedy(lora, PROMPTS[4], 8)
    assert all(r.merged == (True,) for r in reports)
    # cooler but above the leave share: stays merged (hysteresis)
    await run(engine, [("dora", dora, PROMPTS[i]) for i in range(4)])  # lora 32 of 72
    assert 0.3 <= engine.hot.shares()["lora"] < 0.6
    engine.hot.evaluate()
    assert engine.is_merged("lora")
    # traffic stops: once its tokens leave the window, the merged copy is dropped
    clock.now += 11.0
    engine.hot.evaluate()
    await engine.hot.settle()
    stats = engine.stats().hot
    assert stats is not None and stats.merged == () and stats.drops == 1
    assert stats.window_tokens == 0 and stats.builds == 1
    [tokens] = await run(engine, [("lora", lora, PROMPTS[5])])  # back on the slot pool
    assert tokens == reference.greedy(lora, PROMPTS[5], 8)


async def test_pin_keeps_adapter_merged_regardless_of_traffic(
        make_engine: EngineFactory, adapters: dict[str, Adapter], reference: Reference) -> None:
    engine = await make_engine(**POLICY)
    clock = Clock()
    engine.hot.clock = clock
    await engine.pin(spec("hra", adapters["hra"]))
    await run(engine, [("soka", adapters["soka"], PROMPTS[i]) for i in range(3)])
    for _ in range(2):  # another adapter carries all the traffic, then none at all
        engine.hot.evaluate()
        await engine.hot.settle()
        assert engine.is_merged("hra")
        clock.now += 100.0
    [tokens] = await run(engine, [("hra", adapters["hra"], PROMPTS[0])])
    assert tokens == reference.greedy(adapters["hra"], PROMPTS[0], 8)
    engine.hot.evaluate()
    assert engine.is_merged("hra")  # its own recent tokens (share 1.0) would keep it too
    assert engine.unpin("hra") and not engine.unpin("hra")
    clock.now += 100.0
    engine.hot.evaluate()
    assert not engine.is_merged("hra")


async def test_non_mergeable_adapter_is_never_merged(
        make_engine: EngineFactory, adapters: dict[str, Adapter], reference: Reference) -> None:
    engine = await make_engine(**POLICY)
    engine.hot.clock = Clock()
    for name in ("bottleneck", "hyperloader"):
        jobs: list[tuple[str, Adapter | None, str]] = [
            (name, adapters[name], PROMPTS[i]) for i in range(3)]
        results = await run(engine, jobs)
        for (_, adapter, prompt), tokens in zip(jobs, results, strict=True):
            assert tokens == reference.greedy(adapter, prompt, 8)
        assert engine.hot.shares()[name] >= 0.6
        engine.hot.evaluate()
        await engine.hot.settle()
        assert not engine.is_merged(name)
        with pytest.raises(NotMergeableError):
            await engine.pin(spec(name, adapters[name]))
        assert not engine.is_merged(name)
        engine.hot.clock.now += 100.0  # type: ignore[attr-defined]
    stats = engine.stats().hot
    assert stats is not None and stats.ineligible == 2 and stats.builds == 0
    assert stats.pinned == ()


async def test_running_rows_finish_on_their_path_when_dropped(
        make_engine: EngineFactory, adapters: dict[str, Adapter], reference: Reference) -> None:
    engine = await make_engine(hot_max_merged=0)
    lora = adapters["lora"]
    await engine.pin(spec("lora", lora))
    merged = engine.submit(GenerationRequest(prompt=PROMPTS[0], adapter=spec("lora", lora),
                                             sampling=GREEDY))
    events = merged.events()
    first = await anext(events)  # the row runs on the merged copy now
    engine.unpin("lora")
    engine.hot.evaluate()  # dropped between steps; new rows go to the slot pool
    assert not engine.is_merged("lora")
    cold = engine.submit(GenerationRequest(prompt=PROMPTS[1], adapter=spec("lora", lora),
                                           sampling=GREEDY))
    rest = [e.token_id async for e in events]
    assert [first.token_id, *rest] == reference.greedy(lora, PROMPTS[0], 8)
    assert (await cold.result()).token_ids == reference.greedy(lora, PROMPTS[1], 8)
    hot = engine.stats().hot
    assert hot is not None and hot.merged_tokens_total == 8  # all 8 of the first row's
    assert not engine.scheduler.stepper.merged  # the dropped copy's group is gone


async def test_policy_runs_on_its_own_timer(make_engine: EngineFactory,
                                            adapters: dict[str, Adapter]) -> None:
    """No manual evaluate and the real clock: the engine's periodic check merges the hot
    adapter, then drops it once its tokens leave the window."""
    engine = await make_engine(**{**POLICY, "hot_window_s": 2.0, "hot_interval_s": 0.02})
    await run(engine, [("soka", adapters["soka"], PROMPTS[i]) for i in range(3)])

    async def until(condition: bool) -> None:
        for _ in range(500):
            if engine.is_merged("soka") == condition:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"is_merged never became {condition}")

    await until(True)
    await until(False)
